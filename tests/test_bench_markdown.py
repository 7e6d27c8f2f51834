"""BENCHMARKS.md sections: a bench command replaces only its own section."""

import pytest

from mor_secure.bench.markdown import read_section, update_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    update_section(md, "ckks", "CKKS", "first ckks")
    update_section(md, "perf", "Performance", "first perf")
    update_section(md, "ckks", "CKKS", "second ckks\nwith two lines")
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "first ckks" not in text and text.count("<!-- bench:ckks -->") == 1
    assert read_section(md, "ckks") == "## CKKS\n\nsecond ckks\nwith two lines"
    assert read_section(md, "perf") == "## Performance\n\nfirst perf"
    assert text.index("bench:ckks") < text.index("bench:perf")  # order kept
    assert not (tmp_path / "BENCHMARKS.md.tmp").exists()


def test_bad_section_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="section name"):
        update_section(tmp_path / "B.md", "Bad Name", "t", "b")
