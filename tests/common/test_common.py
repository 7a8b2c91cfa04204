"""The shared helpers: JSONL torn-tail policy, seed derivation, name suggestions."""

import doctest
import json
import warnings

import pytest

import alp_agents.common.jsonl as jsonl_module
import alp_agents.common.seeding as seeding_module
import alp_agents.common.suggest as suggest_module
from alp_agents.common import append_jsonl, derive_seed, did_you_mean, read_jsonl, rewrite_jsonl


@pytest.mark.parametrize("module", [jsonl_module, seeding_module, suggest_module])
def test_docstring_examples(module):
    failures, tried = doctest.testmod(module)
    assert tried > 0 and failures == 0


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "a") as f:
        f.write('{"step": 3, "loss"')
    with pytest.warns(RuntimeWarning, match=r"m.jsonl:3"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_jsonl(path)


def test_non_object_row_is_rejected(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")


def test_rewrite_keeps_matching_rows_and_drops_a_torn_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"st')
    dropped = rewrite_jsonl(path, lambda row: row["step"] <= 3)
    assert dropped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn tail any more
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_derived_seeds_differ_by_every_part_and_fit_the_width():
    seeds = {derive_seed("noise", s, step) for s in range(20) for step in range(20)}
    assert len(seeds) == 400  # no collisions where seed * p + step arithmetic would collide
    assert derive_seed("a", 1, 2) != derive_seed("a", 2, 1)
    assert all(0 <= derive_seed("w", i, bits=31) < 2**31 for i in range(100))
    with pytest.raises(ValueError):
        derive_seed("w", bits=65)


def test_did_you_mean():
    assert did_you_mean("grpoo", ["grpo", "gspo", "alp"]) == " Did you mean 'grpo'?"
    assert did_you_mean("", ["grpo"]) == ""
