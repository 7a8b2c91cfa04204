"""Tests for the shopping-cart example (run: ``python -m pytest docs/examples``).

A template for testing a stateful tool environment: the tool's schema, a scripted episode
that checks the rubric's rewards and the episode state, bad calls, the native (template)
tool prompt, and ``envs.check_env``.
"""

from __future__ import annotations

import pytest
import shop_env as example

import envs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    folder = example.write_problem_files(tmp_path_factory.mktemp("shop"), n_train=20, n_test=5)
    return str(folder / "{split}.parquet")


def call(item: str, quantity: int) -> str:
    return f'<tool_call>{{"name": "add_to_cart", "arguments": {{"item": "{item}", "quantity": {quantity}}}}}</tool_call>'


def test_the_context_parameter_is_not_in_the_schema():
    params = example.add_to_cart.schema()["function"]["parameters"]
    assert params["required"] == ["item", "quantity"] and "ctx" not in params["properties"]


def test_the_parquet_files_load_with_the_column_mapping(dataset):
    test = envs.load_dataset(dataset, split="test", columns=example.COLUMNS)
    train = envs.load_dataset(dataset, split="train", columns=example.COLUMNS)
    assert len(test) == 5 and len(train) == 20
    assert envs.dataset_overlap(train, test).n_overlap == 0
    first = test[0]
    assert (first.id, first.answer, first.source) == ("shop-test-0", "845", "shop")
    assert first.metadata == {"items": "apple,lemon,mango"}


def test_scripted_episode_rewards_and_state(dataset):
    env = envs.make("shop/Cart-v0", dataset=dataset)
    _, info = env.reset(options={"problem_id": "shop-test-0"})
    assert info["messages"][-1]["content"].startswith("Buy 5 apples, 4 lemons and 4 mangoes.")
    assert env.episode_state == {"cart": {}}  # setup_state ran

    # Two async calls in one turn run concurrently; results come back in call order.
    obs, reward, terminated, _, info = env.step(
        "I will add them. " + call("apple", 5) + call("lemon", 4)
    )
    assert not terminated and obs.count("<tool_response>") == 2
    assert "cart: 5 apple, 4 lemon; total 365 cents" in obs
    assert reward == pytest.approx(0.2) and info["rewards"] == {"tool_use": 1.0}
    assert env.episode_state["cart"] == {"apple": 5, "lemon": 4}

    obs, reward, _, _, info = env.step(call("mango", 4))
    assert "total 845 cents" in obs
    assert reward == 0.0 and info["rewards"] == {"tool_use": 0.0}  # paid for the first turn only

    _, reward, terminated, _, info = env.step("The total is \\boxed{845}.")
    assert terminated and info["finish_reason"] == "answer"
    assert reward == 1.0 and info["rewards"] == {"correctness": 1.0, "tool_use": 0.0}
    assert env.last_cart == {"apple": 5, "lemon": 4, "mango": 4}  # cleanup_state ran

    env.reset(options={"problem_id": "shop-test-1"})
    assert env.episode_state == {"cart": {}}  # a fresh cart for every episode


def test_bad_calls_are_shown_to_the_model_not_raised(dataset):
    env = envs.make("shop/Cart-v0", dataset=dataset)
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(call("kiwi", 1))
    assert not terminated and "unknown item 'kiwi'" in obs and reward == 0.0
    assert info["tool_results"][0]["status"] == "error" and info["rewards"] == {"tool_use": 0.0}
    obs, *_ = env.step(call("pear", 0))
    assert "quantity must be 1 or more" in obs
    assert env.episode_state["cart"] == {}


def test_native_tool_prompt_and_the_fallback(dataset):
    env = envs.make("shop/Cart-v0", dataset=dataset, one_shot=True)
    # A template that renders tools= (Qwen2.5, Qwen3...): the rollout passes the schemas to it.
    assert env.configure_tool_prompt(template_renders_tools=True) == [example.add_to_cart.schema()]
    _, info = env.reset(seed=0)
    roles = [m["role"] for m in info["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "add_to_cart" not in info["messages"][0]["content"]  # the template lists the tools
    assert info["messages"][2]["tool_calls"][0]["function"]["arguments"] == {
        "item": "lemon",
        "quantity": 2,
    }
    _, _, _, _, info = env.step(call("pear", 2))
    assert info["messages"] == [{"role": "tool", "content": "cart: 2 pear; total 120 cents"}]

    # SmolLM2's template ignores tools=: "auto" falls back to the env's system message.
    assert env.configure_tool_prompt(template_renders_tools=False) is None
    _, info = env.reset(seed=0)
    assert '"name": "add_to_cart"' in info["messages"][0]["content"]
    assert "<tool_call>" in info["messages"][2]["content"]
    strict = envs.make("shop/Cart-v0", dataset=dataset, tool_prompt="template")
    with pytest.raises(ValueError, match="does not render tools"):
        strict.configure_tool_prompt(template_renders_tools=False)


def test_check_env(dataset):
    report = envs.check_env(envs.make("shop/Cart-v0", dataset=dataset))
    assert report.ok, report
