"""Datasets: bundled files match their SOURCES.md, bad input names file/line/id, arith splits,
user files and tables with column mappings, plugin datasets."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest

import envs
from envs.datasets import _GENERATORS, BUNDLED, DATA_DIR, _cache


def _counts_from_sources() -> dict[str, int]:
    """file -> count, read from the provenance table in SOURCES.md (the data's own record)."""
    text = (DATA_DIR / "SOURCES.md").read_text()
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\| (\w+\.jsonl) \| (\d+) \|", text, re.M)
    }


def test_every_bundled_dataset_loads_with_the_count_its_sources_record():
    counts = _counts_from_sources()
    assert set(counts) == set(BUNDLED.values())
    for name, filename in BUNDLED.items():
        problems = envs.load_dataset(name)
        assert len(problems) == counts[filename], name
        assert len({p.id for p in problems}) == len(problems)
        assert all(p.question.strip() and p.answer.strip() and p.source for p in problems)


def test_names_splits_and_aliases():
    assert envs.load_dataset("gsm8k", split="test") == envs.load_dataset("gsm8k_test")
    assert envs.load_dataset("gsm8k_train", split="train")[0].id == "gsm8k-train-0"
    assert envs.load_dataset("simplelr_math_35_train") == envs.load_dataset("simplelr_math35_train")
    math500 = envs.load_dataset("math500", split="test")
    assert math500[0].metadata["level"] == 2 and "level" not in math500[0].to_dict().get(
        "metadata", {}
    )
    with pytest.raises(envs.DatasetError, match="'test' split"):
        envs.load_dataset("gsm8k_test", split="train")
    with pytest.raises(envs.DatasetError, match="splits \\['test', 'train'\\]"):
        envs.load_dataset("gsm8k")


def test_unknown_name_lists_close_matches():
    with pytest.raises(envs.DatasetError, match="Did you mean 'math500'"):
        envs.load_dataset("math50")


def test_loaded_lists_are_independent_copies():
    a = envs.load_dataset("aime24")
    a.clear()
    assert len(envs.load_dataset("aime24")) == 30


def test_user_jsonl_defaults_and_metadata(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "1+1?", "answer": 2, "difficulty": "easy"}\n\n{"id": "b", "question": "q", "answer": "x"}\n'
    )
    first, second = envs.load_dataset(path)
    assert (first.id, first.answer, first.source, first.metadata) == (
        "mine-1",
        "2",
        "mine",
        {"difficulty": "easy"},
    )
    assert second.id == "b"
    round_trip = envs.load_dataset(envs.write_jsonl([first, second], tmp_path / "copy.jsonl"))
    assert [p.to_dict() for p in round_trip] == [first.to_dict(), second.to_dict()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "p1", "question": "What?", "answer": "1"', r"bad\.jsonl:2: invalid JSON"),
        ('["not", "an", "object"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"id": "p7", "question": "What?"}', r"bad\.jsonl:2: problem 'p7' has no 'answer'"),
        ('{"id": "p8", "question": "What?", "answer": "  "}', r"problem 'p8' has no 'answer'"),
        ('{"id": "p9", "answer": "3"}', r"bad\.jsonl:2: problem 'p9' has no 'question'"),
        (
            '{"id": "p0", "question": "again", "answer": "3"}',
            r"bad\.jsonl:2: duplicate id 'p0' \(first on line 1\)",
        ),
    ],
)
def test_bad_jsonl_names_file_line_and_id(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "p0", "question": "ok", "answer": "1"}) + "\n" + line + "\n")
    with pytest.raises(envs.DatasetError, match=message):
        envs.load_dataset(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(envs.DatasetError, match="not found"):
        envs.load_dataset(tmp_path / "nope.jsonl")


def _value(expression: str) -> int:
    """Evaluate 'a op b [op c]' (+, -, * with * first) without eval()."""
    tokens = expression.split()
    terms, signs = [int(tokens[0])], []
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "*":
            terms[-1] *= int(number)
        else:
            signs.append(op)
            terms.append(int(number))
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


@pytest.mark.parametrize("name", ["arith_easy", "arith", "arith_hard"])
def test_arith_splits_are_disjoint_deterministic_and_correct(name):
    train = envs.load_dataset(name, split="train", n=2000)
    test = envs.load_dataset(name, split="test")
    assert len(test) == 500 and len(train) == 2000
    assert envs.dataset_overlap(train, test).n_overlap == 0
    assert train == envs.load_dataset(name, split="train", n=2000)  # same seed, same problems
    other_seed = envs.load_dataset(name, split="train", n=2000, seed=1)
    assert other_seed != train and envs.dataset_overlap(other_seed, test).n_overlap == 0
    for problem in train[:200] + test[:200]:
        assert problem.answer == str(_value(problem.metadata["expression"]))
    assert test[17].id == f"{name}-test-17"
    assert len({p.question for p in train}) == len(train)


def test_arith_small_covers_its_question_space_without_leaking():
    train = envs.load_dataset("arith_small", split="train")
    test = envs.load_dataset("arith_small", split="test")
    assert (len(train), len(test)) == (600, 120)  # of ~640 / ~160 distinct questions
    assert envs.dataset_overlap(train, test).n_overlap == 0
    assert len({p.question for p in train + test}) == 720
    for problem in train + test:
        a, op, b = problem.metadata["expression"].split()
        assert 1 <= int(a) <= 20 and 1 <= int(b) <= 20 and op in "+-"
        assert problem.answer == str(_value(problem.metadata["expression"]))
    with pytest.raises(envs.DatasetError, match="could not draw"):
        envs.load_dataset("arith_small", split="test", n=400)  # more than exist


def test_arith_levels_differ_in_difficulty():
    digits = {
        name: max(
            len(t)
            for p in envs.load_dataset(name, split="test", n=50)
            for t in p.metadata["expression"].split()
        )
        for name in ("arith_easy", "arith", "arith_hard")
    }
    assert digits["arith_easy"] == 2 and digits["arith"] >= 3 and digits["arith_hard"] >= 4


def test_arith_bad_options():
    with pytest.raises(envs.DatasetError, match="splits"):
        envs.load_dataset("arith", split="validation")
    with pytest.raises(envs.DatasetError, match="level"):
        envs.load_dataset("arith", level="impossible")
    with pytest.raises(envs.DatasetError, match="takes no options"):
        envs.load_dataset("math500", n=3)


def test_overlap_finds_reworded_whitespace_and_case():
    train = [envs.Problem("t1", "What is  2+2?", "4"), envs.Problem("t2", "Other", "1")]
    test = [envs.Problem("e1", "what is 2 + 2?", "4"), envs.Problem("e2", "New one", "5")]
    report = envs.dataset_overlap(train, test)
    assert report.pairs == (("t1", "e1"),) and report.fraction == 0.5
    assert "1/2 test problems" in str(report)


def test_bundled_gsm8k_train_and_test_do_not_overlap():
    report = envs.dataset_overlap(envs.load_dataset("gsm8k_train"), envs.load_dataset("gsm8k_test"))
    assert report.n_train == 7473 and report.n_overlap == 0


# ----------------------------------------------------------------------------- files and tables


def _write_jsonl_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [
    {"prompt": "What is 2 + 3?", "solution": 5, "level": "easy"},
    {"prompt": "What is 7 * 6?", "solution": "42", "level": "hard"},
]


def test_jsonl_with_a_column_mapping_needs_no_extras(tmp_path):
    path = _write_jsonl_rows(tmp_path / "mine.jsonl", ROWS)
    problems = envs.load_dataset(path, columns={"question": "prompt", "answer": "solution"})
    assert [(p.id, p.question, p.answer, p.source, p.metadata) for p in problems] == [
        ("mine-1", "What is 2 + 3?", "5", "mine", {"level": "easy"}),
        ("mine-2", "What is 7 * 6?", "42", "mine", {"level": "hard"}),
    ]


def test_a_displaced_column_is_kept_as_original_and_round_trips(tmp_path):
    rows = [{"question": "Q?", "answer": "long worked solution #### 4", "final": "4"}]
    path = _write_jsonl_rows(tmp_path / "gsm.jsonl", rows)
    (problem,) = envs.load_dataset(path, columns={"answer": "final"})
    assert problem.answer == "4"
    assert problem.metadata == {"original_answer": "long worked solution #### 4"}
    again = envs.load_dataset(envs.write_jsonl([problem], tmp_path / "copy.jsonl"))
    assert again[0].to_dict() == problem.to_dict()


def test_missing_columns_name_file_line_and_close_matches(tmp_path):
    path = _write_jsonl_rows(tmp_path / "typo.jsonl", ROWS)
    with pytest.raises(envs.DatasetError) as err:
        envs.load_dataset(path, columns={"question": "promt", "answer": "solution"})
    assert str(err.value) == (
        f"{path.resolve()}:1: no column 'promt' (mapped to 'question'); the record has "
        "['level', 'prompt', 'solution']. Did you mean 'prompt'?"
    )
    capital = _write_jsonl_rows(tmp_path / "caps.jsonl", [{"question": "Q?", "Answer": "1"}])
    with pytest.raises(
        envs.DatasetError,
        match=r"caps\.jsonl:1: problem 'caps-1' has no 'answer' \(a non-empty string\)\. "
        r"Did you mean 'Answer'\? Map a column with columns=\{'answer': COLUMN\}\.",
    ):
        envs.load_dataset(capital)


def test_a_value_of_the_wrong_type_names_its_column_and_type(tmp_path):
    rows = [{"id": "c1", "prompt": [{"role": "user", "content": "Hi"}], "solution": "1"}]
    path = _write_jsonl_rows(tmp_path / "chat.jsonl", rows)
    with pytest.raises(
        envs.DatasetError,
        match=r"chat\.jsonl:1: problem 'c1' has no 'question' \(a non-empty string\) "
        r"\(column 'prompt' is a list: \[\{'role': 'user', 'content': 'Hi'\}\]\)",
    ):
        envs.load_dataset(path, columns={"question": "prompt", "answer": "solution"})


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (
            {"prompt": "question"},
            r"'prompt' is not a problem field .* did you mean \{'question': 'prompt'\}",
        ),
        ({"answr": "solution"}, r"'answr' is not a problem field .*Did you mean 'answer'\?"),
        ({"question": ""}, r"columns\['question'\] must be a column name"),
        (["question"], r"columns must be a mapping \{field: column\}, got list"),
    ],
)
def test_bad_column_mappings_are_explained(tmp_path, columns, message):
    path = _write_jsonl_rows(tmp_path / "m.jsonl", ROWS)
    with pytest.raises(envs.DatasetError, match=message):
        envs.load_dataset(path, columns=columns)


def test_columns_do_not_apply_to_named_datasets():
    with pytest.raises(envs.DatasetError, match="'math500' is a bundled dataset"):
        envs.load_dataset("math500", columns={"question": "problem"})
    with pytest.raises(envs.DatasetError, match="'arith' is a procedural dataset"):
        envs.load_dataset("arith", split="test", columns={"question": "q"})


def test_split_placeholder_picks_the_file(tmp_path):
    _write_jsonl_rows(tmp_path / "train.jsonl", ROWS[:1])
    _write_jsonl_rows(tmp_path / "test.jsonl", ROWS[1:])
    name = str(tmp_path / "{split}.jsonl")
    columns = {"question": "prompt", "answer": "solution"}
    assert [p.answer for p in envs.load_dataset(name, split="train", columns=columns)] == ["5"]
    assert [p.id for p in envs.load_dataset(name, split="test", columns=columns)] == ["test-1"]
    assert envs.is_dataset_file(name) and not envs.is_dataset_file("gsm8k")
    with pytest.raises(envs.DatasetError, match=r"placeholder; pass split="):
        envs.load_dataset(name)


def test_a_folder_is_not_a_problem_file(tmp_path):
    with pytest.raises(envs.DatasetError, match="is a folder.*load_from_disk"):
        envs.load_dataset(str(tmp_path) + "/")


def _pyarrow():
    return pytest.importorskip("pyarrow", reason="Parquet/Arrow need pyarrow (the data extra)")


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".arrow-stream", ".feather"])
def test_parquet_and_arrow_files_with_a_column_mapping(tmp_path, suffix):
    pa = _pyarrow()
    import pyarrow.feather
    import pyarrow.parquet

    table = pa.table(
        {
            "uid": ["a", "b"],
            "prompt": ["What is 2 + 3?", "What is 7 * 6?"],
            "solution": [5, 42],
            "tags": [["add"], ["mul", "two-digit"]],
        }
    )
    path = tmp_path / ("data" + suffix.replace("-stream", ""))
    if suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    elif suffix == ".arrow":  # Arrow IPC file format
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif suffix == ".arrow-stream":  # the stream format of datasets' cache files
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pyarrow.feather.write_feather(table, path)
    problems = envs.load_dataset(
        path, columns={"id": "uid", "question": "prompt", "answer": "solution"}
    )
    assert [(p.id, p.question, p.answer, p.source, p.metadata) for p in problems] == [
        ("a", "What is 2 + 3?", "5", "data", {"tags": ["add"]}),
        ("b", "What is 7 * 6?", "42", "data", {"tags": ["mul", "two-digit"]}),
    ]


def test_parquet_errors_name_file_row_and_column(tmp_path):
    pa = _pyarrow()
    import pyarrow.parquet

    path = tmp_path / "probs.parquet"
    pyarrow.parquet.write_table(
        pa.table({"problem": ["Q1?", "Q2?", "Q3?"], "answer": ["1", None, "3"]}), path
    )
    with pytest.raises(envs.DatasetError) as err:
        envs.load_dataset(path)
    assert str(err.value) == (
        f"{path.resolve()}: no 'question' column; columns: ['problem', 'answer']. "
        "Map one with columns={'question': COLUMN}."
    )
    with pytest.raises(envs.DatasetError) as err:
        envs.load_dataset(path, columns={"question": "problems"})
    assert str(err.value).endswith(
        "probs.parquet: no column 'problems' (mapped to 'question'); columns: "
        "['problem', 'answer']. Did you mean 'problem'?"
    )
    with pytest.raises(
        envs.DatasetError,
        match=r"probs\.parquet: row 1: problem 'probs-1' has no 'answer' \(a non-empty string\)$",
    ):
        envs.load_dataset(path, columns={"question": "problem"})
    dupes = tmp_path / "dupes.parquet"
    pyarrow.parquet.write_table(
        pa.table({"id": [7, 8, 7], "question": ["a", "b", "c"], "answer": ["1", "2", "3"]}), dupes
    )
    with pytest.raises(envs.DatasetError, match=r"row 2: duplicate id '7' \(first in row 0\)"):
        envs.load_dataset(dupes)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(envs.DatasetError, match=r"broken\.parquet: not a readable parquet file"):
        envs.load_dataset(broken)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import fails
    with pytest.raises(envs.DatasetError, match=r"needs pyarrow: pip install 'alp-agents\[data\]'"):
        envs.load_dataset(path)


def test_a_pyarrow_table_is_a_dataset():
    pa = _pyarrow()
    table = pa.table({"q": ["What is 1 + 1?"], "a": ["2"]})
    (problem,) = envs.load_dataset(table, columns={"question": "q", "answer": "a"})
    assert (problem.id, problem.question, problem.answer, problem.source) == (
        "dataset-0",
        "What is 1 + 1?",
        "2",
        "dataset",
    )
    with pytest.raises(envs.DatasetError, match=r"Table 'dataset': no 'answer' column"):
        envs.load_dataset(table, columns={"question": "q"})


def test_hugging_face_datasets_and_dataset_dicts():
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package")
    train = datasets.Dataset.from_dict(
        {"prompt": ["What is 2 + 3?", "What is 4 + 4?"], "solution": ["5", "8"]},
        split="train",
    )
    test = datasets.Dataset.from_dict({"prompt": ["What is 9 - 1?"], "solution": [8]}, split="test")
    columns = {"question": "prompt", "answer": "solution"}
    problems = envs.load_dataset(train, columns=columns)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("dataset-train-0", "What is 2 + 3?", "5"),
        ("dataset-train-1", "What is 4 + 4?", "8"),
    ]
    again = envs.load_dataset(train, columns=columns)  # converted once per fingerprint
    assert again == problems and again is not problems
    assert ("table", train._fingerprint, "train", tuple(sorted(columns.items()))) in _cache
    both = datasets.DatasetDict({"train": train, "test": test})
    assert [p.answer for p in envs.load_dataset(both, split="test", columns=columns)] == ["8"]
    with pytest.raises(envs.DatasetError, match=r"no split 'tset'.*Did you mean 'test'\?"):
        envs.load_dataset(both, split="tset", columns=columns)
    with pytest.raises(envs.DatasetError, match=r"is the 'train' split; got split='test'"):
        envs.load_dataset(train, split="test", columns=columns)
    env = envs.make("alp/Math-v0", dataset=both, split="test", dataset_options={"columns": columns})
    _, info = env.reset(seed=0)
    assert info["problem_id"] == "dataset-test-0"


def test_other_objects_are_refused_with_what_is_accepted():
    with pytest.raises(envs.DatasetError, match=r"a table with column_names .* got int"):
        envs.load_dataset(42)
    with pytest.raises(envs.DatasetError, match=r"must map split names to tables"):
        envs.load_dataset({"train": [1, 2]})


# ----------------------------------------------------------------------------- plugins


def _install_dataset_plugin(tmp_path, monkeypatch, module_body: str) -> None:
    """What pip writes for a package with an ``alp_agents.datasets`` entry point."""
    (tmp_path / "dates_plugin.py").write_text(textwrap.dedent(module_body))
    dist = tmp_path / "dates_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dates-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{envs.DATASET_ENTRY_POINT_GROUP}]\ndates = dates_plugin:dates\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_plugin_datasets_are_listed_before_any_load_and_suggested(tmp_path, monkeypatch):
    _install_dataset_plugin(
        tmp_path,
        monkeypatch,
        """
        import envs

        def dates(split="train", n=2):
            return [envs.Problem(f"d-{split}-{i}", f"How many days in week {i}?", "7")
                    for i in range(n)]
        """,
    )
    try:
        assert "dates" in envs.available_datasets()
        assert "dates_plugin" not in sys.modules  # listed without importing the plugin
        with pytest.raises(
            envs.DatasetError, match=r"unknown dataset 'datse'\. Did you mean 'dates'"
        ):
            envs.load_dataset("datse")
        assert [p.id for p in envs.load_dataset("dates", split="test", n=1)] == ["d-test-0"]
    finally:
        sys.modules.pop("dates_plugin", None)
        _GENERATORS.pop("dates", None)


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    _install_dataset_plugin(tmp_path, monkeypatch, "raise RuntimeError('no calendar here')\n")
    try:
        with pytest.raises(
            envs.DatasetError,
            match=r"dataset 'dates' comes from the entry point dates = dates_plugin:dates "
            r"\(package dates-plugin\), which failed to load: RuntimeError: no calendar here",
        ):
            envs.load_dataset("dates")
    finally:
        sys.modules.pop("dates_plugin", None)


def test_in_process_generators_are_listed_and_suggested():
    envs.register_generator("weekdays_demo", lambda split="train": [envs.Problem("w", "Q?", "1")])
    try:
        assert "weekdays_demo" in envs.available_datasets()
        with pytest.raises(envs.DatasetError, match="Did you mean 'weekdays_demo'"):
            envs.load_dataset("weekday_demo")
    finally:
        _GENERATORS.pop("weekdays_demo", None)


# ----------------------------------------------------------------------------- the guide


def test_the_guides_dataset_examples_print_what_their_comments_say(capsys):
    """docs/environments.md's file/table and plugin examples: each ``print(...)  # output``
    comment is what the line prints (``...`` stands for any text)."""
    _pyarrow()
    text = (DATA_DIR.parents[1] / "docs" / "environments.md").read_text()
    start = text.index("### Problem files, tables and column mappings")
    section = text[start : text.index("\n## ", start)]
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
        if not b.lstrip().startswith("# illustrative")
    ]
    expected = [
        m.group(1).strip()
        for block in blocks
        for m in re.finditer(r"^\s*print\(.*\)\s+# (.*)$", block, flags=re.M)
    ]
    assert len(blocks) == 2 and len(expected) == 7
    namespace: dict = {"__name__": "docs_example"}
    try:
        for block in blocks:
            exec(compile(block, "<docs/environments.md>", "exec", dont_inherit=True), namespace)
    finally:
        _GENERATORS.pop("dates", None)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(expected)
    for line, want in zip(printed, expected, strict=True):
        pattern = ".*".join(re.escape(part) for part in want.split("..."))
        assert re.fullmatch(pattern, line), (line, want)
