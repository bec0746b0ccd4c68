"""The built-in calibration prompts and prompt files."""

from __future__ import annotations

import pytest

import qcompile
from qcompile import CalibrationError, load_prompts

MIN_PROMPTS = 64  # issue 14: at least 64 varied prompts


def test_builtin_set_is_large_distinct_and_varied():
    prompts = qcompile.CALIBRATION_PROMPTS
    assert len(prompts) >= MIN_PROMPTS
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and p for p in prompts)
    lengths = sorted(len(p.split()) for p in prompts)
    assert lengths[0] <= 8 and lengths[-1] >= 12  # short and long prompts
    vocabulary = {w.strip(",.").lower() for p in prompts for w in p.split()}
    assert len(vocabulary) >= 5 * len(prompts)  # not one template with a word swapped
    # people, animals, places, food, text in the image, art styles all appear
    for theme in ("portrait", "cat", "forest", "soup", "sign", "painting"):
        assert any(theme in p for p in prompts), theme


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# styles\na red fox\n\n  a blue whale  \n#\n", encoding="utf-8")
    assert load_prompts(path) == ["a red fox", "a blue whale"]


def test_tsv_reads_the_caption_column(tmp_path):
    path = tmp_path / "captions.tsv"
    path.write_text("id\tCaption\turl\n1\ta red fox\tx\n2\t\ty\n3\ta blue whale\tz\n")
    assert load_prompts(path) == ["a red fox", "a blue whale"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n# only a comment\n", "holds no prompts"),
        ("no_caption.tsv", "id\ttext\n1\ta fox\n", "no 'caption' column"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationError, match=message):
        load_prompts(path)
