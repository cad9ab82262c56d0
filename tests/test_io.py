import stat

from utils.io import write_json


def test_an_atomic_write_is_as_readable_as_a_plain_one(tmp_path):
    (tmp_path / "plain.json").write_text("{}")
    write_json(tmp_path / "atomic.json", {})
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["atomic.json", "plain.json"]
