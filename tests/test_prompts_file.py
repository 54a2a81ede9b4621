"""`--prompts FILE`: the file types, ids and the errors of `read_prompts` (no models)."""

import pytest

from guidegen.errors import GuideGenError
from guidegen.pipeline import id_seed_offset, read_prompts


def _ids(path):
    return [(it.id, it.prompt) for it in read_prompts(path)]


def test_file_types_and_id_columns(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("liver mass 3 cm\n\n   \nnormal CT\n")
    assert _ids(txt) == [("p0000", "liver mass 3 cm"), ("p0001", "normal CT")]
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_bytes("\ufeffid,prompt\ncaseA,liver mass\ncaseB,\"spleen mass, 2 cm\"\n".encode("utf-8"))
    assert _ids(bom) == [("caseA", "liver mass"), ("caseB", "spleen mass, 2 cm")]
    case_col = tmp_path / "c.csv"  # `case`, as in reports.jsonl and guidegen prepare
    case_col.write_text("case,text\nx1,60 yo woman\n")
    assert _ids(case_col) == [("x1", "60 yo woman")]
    multi = tmp_path / "m.csv"
    multi.write_text('id,prompt\na,"first line\nsecond line"\n')
    assert _ids(multi) == [("a", "first line\nsecond line")]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("id\tprompt\na\t60 yo woman, liver mass\n")
    assert _ids(tsv) == [("a", "60 yo woman, liver mass")]
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_bytes('\ufeff{"case": "k", "prompt": "a"}\n{"id": null, "text": "b"}\n'.encode("utf-8"))
    assert _ids(jsonl) == [("k", "a"), ("p0001", "b")]  # a null id is a missing one, not 'None'


@pytest.mark.parametrize("name, content, message", [
    ("a.json", '[{"id": "a", "prompt": "x"}]', "unknown prompts file type '.json'"),
    ("a.csv", "id,words\na,x\n", "needs a 'prompt' or 'text' column (has id, words)"),
    ("a.jsonl", '{"id": "a", "prompt": "x"}\n["b"]\n', "a.jsonl:2: each line must be a JSON object"),
    ("a.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "a.jsonl:2: duplicate prompt id 'a'"),
    ("a.csv", "id,prompt\nCase1,x\ncase1,y\n", "a.csv:2) only in case: one file name on case-insensitive file systems"),
    ("a.csv", "id,prompt\nok,x\n../x,y\n", "a.csv:3: invalid case id '../x'"),
    ("a.csv", "id,prompt\nok,x\nempty,\n", "a.csv:3: prompt 'empty' is empty or missing"),
    ("a.txt", "\n \n", "no prompts found"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(GuideGenError, match=f"^{tmp_path}/.*"):
        read_prompts(path)
    with pytest.raises(GuideGenError) as err:
        read_prompts(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_directory_is_not_a_prompts_file(tmp_path):
    with pytest.raises(GuideGenError, match="is a directory"):
        read_prompts(tmp_path)


def test_seed_offsets_follow_the_id_not_the_line(tmp_path):
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    first.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    second.write_text('{"id": "new", "prompt": "z"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "x"}\n')
    one, two = {it.id: it.seed_offset for it in read_prompts(first)}, {it.id: it.seed_offset for it in read_prompts(second)}
    assert one["a"] == two["a"] == id_seed_offset("a") and one["b"] == two["b"] != one["a"]
    assert 0 <= id_seed_offset("a") < 2**28
