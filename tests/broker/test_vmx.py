"""The .vmx format: round trip, unknown keys kept, bad files refused."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import vmx


def test_new_vmx_round_trips_through_a_file(tmp_path):
    vm_uuid = str(uuid.uuid4())
    v = vmx.Vmx.new("web-01", vm_uuid, "vtpm:keysafe/1/(x)", vtpm=True)
    path = tmp_path / "web-01.vmx"
    vmx.write(path, v)
    back = vmx.read(path)
    assert back.name == "web-01" and back.vm_uuid == vm_uuid
    assert back.key_safe == "vtpm:keysafe/1/(x)" and back.has_vtpm and back.nvram_name == "web-01.nvram"


def test_unknown_keys_and_their_order_are_kept():
    text = 'a.b = "1"\nvtpm.present = "TRUE"\nz = "quote \\" inside"\n'
    v = vmx.parses(text)
    assert list(v.entries) == ["a.b", "vtpm.present", "z"]
    assert v.entries["z"] == 'quote " inside'
    assert vmx.parses(vmx.formats(v)).entries == v.entries


@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9_.]{0,20}", fullmatch=True),
                       st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)))))
def test_any_entries_round_trip(entries):
    v = vmx.Vmx(dict(entries))
    parsed = vmx.parses(vmx.formats(v))
    parsed.entries.pop(".encoding", None)
    assert parsed.entries == {k: val for k, val in entries.items() if k != ".encoding"}


@pytest.mark.parametrize("text, message", [
    ("no equals sign\n", "line 1"),
    ('uuid.bios = "not-a-uuid"\n', "not a UUID"),
])
def test_bad_files_are_refused_with_a_reason(text, message):
    with pytest.raises(vmx.VmxError) as failure:
        _ = vmx.parses(text).vm_uuid
    assert message in str(failure.value)


def test_missing_key_safe_and_path_in_nvram_are_refused():
    v = vmx.parses('displayName = "a"\nnvram = "../../etc/passwd"\n')
    with pytest.raises(vmx.VmxError, match="not encrypted"):
        _ = v.key_safe
    with pytest.raises(vmx.VmxError, match="file name beside"):
        _ = v.nvram_name


def test_find_vms(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        vmx.write(tmp_path / name / f"{name}.vmx", vmx.Vmx.new(name, str(uuid.uuid4()), "ks", vtpm=True))
    assert [p.name for p in vmx.find_vms(tmp_path)] == ["a.vmx", "b.vmx"]
