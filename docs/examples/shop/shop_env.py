"""A stateful, async tool environment in one file: a shopping cart.

Read docs/examples/shop/README.md for the walk-through. In short:

1. ``add_to_cart`` is an ``async def`` tool with an ``envs.ToolContext`` parameter: the env fills
   it on every call, the model never sees it, and ``ctx.state["cart"]`` keeps the cart across
   the calls of one episode (fresh at every ``reset``).
2. ``write_problem_files`` writes the problems as Parquet files (``train.parquet``,
   ``test.parquet``) whose columns are *not* named ``question``/``answer``; ``COLUMNS`` maps them.
3. ``ShopEnv`` subclasses ``envs.ToolEnv`` with ``tool_prompt="auto"`` (the default): the chat
   template renders the tools when it can, else the env's system message lists them. It sets
   a ``rubric`` (correctness + a tool-use bonus) and a one-shot ``example``.
4. Importing the module registers ``shop/Cart-v0``: ``train/evaluate.py --import shop_env`` and
   ``train/multi_turn.py --import shop_env`` see it.

    >>> import tempfile, envs, shop_env
    >>> folder = shop_env.write_problem_files(tempfile.mkdtemp())
    >>> env = envs.make("shop/Cart-v0", dataset=str(folder / "{split}.parquet"))
    >>> _, info = env.reset(options={"problem_id": "shop-test-0"})
    >>> info["messages"][-1]["content"]
    'Buy 5 apples, 4 lemons and 4 mangoes. What do they cost in total, in cents?'
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import envs
from envs import rewards

#: Prices in cents; the tool reads them through an async "price service".
PRICES = {"apple": 45, "banana": 25, "lemon": 35, "mango": 120, "orange": 55, "pear": 60}

#: Which column of the problem files fills which problem field ({field: column}).
COLUMNS = {"id": "uid", "question": "prompt", "answer": "total_cents"}


async def lookup_price(item: str) -> int:
    """Stands for a network call (a price API, a database): something a tool awaits."""
    await asyncio.sleep(0.001)
    if item not in PRICES:
        raise ValueError(f"unknown item {item!r}; we sell {', '.join(PRICES)}")
    return PRICES[item]


@envs.tool
async def add_to_cart(item: str, quantity: int, ctx: envs.ToolContext) -> str:
    """Put items into the shopping cart; returns the cart and its total price in cents.

    Args:
        item: what to buy: apple, banana, lemon, mango, orange or pear.
        quantity: how many to add (1 or more).
    """
    if quantity < 1:
        raise ValueError(f"quantity must be 1 or more, got {quantity}")
    price = await lookup_price(item)
    cart = ctx.state["cart"]  # this episode's cart: setup_state made it empty
    cart[item] = cart.get(item, 0) + quantity
    ctx.state["total"] = ctx.state.get("total", 0) + price * quantity
    contents = ", ".join(f"{n} {name}" for name, n in cart.items())
    return f"cart: {contents}; total {ctx.state['total']} cents"


def _plural(n: int, item: str) -> str:
    return f"{n} {item}" if n == 1 else f"{n} {item}es" if item.endswith("o") else f"{n} {item}s"


def write_problem_files(folder: str | Path, n_train: int = 200, n_test: int = 20) -> Path:
    """Write ``train.parquet`` and ``test.parquet`` into ``folder`` (made if missing).

    Columns ``uid``, ``prompt``, ``total_cents`` (an integer) and ``items`` (kept as metadata):
    a file of your own rarely has the names ``envs`` expects, so the env loads it with
    ``COLUMNS``. Seeded; no question is in both files. Needs pyarrow (``alp-agents[data]``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    seen: set[str] = set()
    for split, n in (("test", n_test), ("train", n_train)):
        rows = []
        while len(rows) < n:
            items = sorted(rng.sample(sorted(PRICES), rng.choice((2, 3))))
            counts = {item: rng.randint(1, 6) for item in items}
            words = [_plural(n_item, item) for item, n_item in counts.items()]
            listed = ", ".join(words[:-1]) + " and " + words[-1]
            prompt = f"Buy {listed}. What do they cost in total, in cents?"
            if prompt in seen:
                continue
            seen.add(prompt)
            total = sum(PRICES[item] * n_item for item, n_item in counts.items())
            rows.append(
                {
                    "uid": f"shop-{split}-{len(rows)}",
                    "prompt": prompt,
                    "total_cents": total,
                    "items": ",".join(items),
                    "source": "shop",
                }
            )
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    return folder


class ShopEnv(envs.ToolEnv):
    """Add the items to the cart with ``add_to_cart``; answer the total in ``\\boxed{}``."""

    tools = [add_to_cart]
    #: correctness at the end (weight 1) plus 0.2 for the first turn whose calls worked.
    rubric = envs.Rubric([rewards.correctness(), rewards.tool_use(weight=0.2)])
    #: ``one_shot=True`` shows this solved episode first, in the env's call format.
    example = envs.ToolExample(
        question="Buy 2 lemons. What do they cost in total, in cents?",
        tool="add_to_cart",
        arguments={"item": "lemon", "quantity": 2},
        result="cart: 2 lemon; total 70 cents",  # the tool needs an episode: give its result
        answer="70",
        thought="I will put them in the cart.\n",
    )
    default_max_turns = 4
    default_instruction = ""  # the system prompt (or the template's tool prompt) says enough

    def __init__(self, dataset: str = "data/{split}.parquet", split: str | None = "test", **kwargs):
        options = dict(kwargs.pop("dataset_options", None) or {})
        if str(dataset).endswith(".parquet"):
            options.setdefault("columns", COLUMNS)  # a CLI's dataset_columns wins
        super().__init__(dataset, split, dataset_options=options, **kwargs)

    def setup_state(self, state: dict) -> None:
        state["cart"] = {}  # per episode: reset() calls this once the problem is chosen

    def cleanup_state(self, state: dict) -> None:
        # A sandbox session or a connection would be closed here.
        self.last_cart = dict(state["cart"])  # nothing to release; kept for the tests


def register() -> None:
    """Make ``envs.make("shop/Cart-v0")`` work in this process (importing the module does it)."""
    envs.register("shop/Cart-v0", ShopEnv)


register()

if __name__ == "__main__":  # python shop_env.py [FOLDER]: write the problem files
    print(write_problem_files(sys.argv[1] if len(sys.argv) > 1 else "data"))
