"""Verity DDIs as upstream builds them. systemd 262's own systemd-repart (tools/peer.sh's
DIR/bin/systemd-repart-sid, run offline on a plain file) makes a usr (sysext) and a root
(confext) DDI with data, verity and signature partitions, signed with a throw-away key, and an
unsigned one. overlayctl must read each as upstream wrote it: the root hash (which repart
reports, and which the partition UUIDs and the signature JSON carry), the signature (checked in
userspace against the root's verity.d), the image policy; and, on a kernel without
device-mapper (this machine, CI), fail clearly, as upstream 262 fails there too, or mount the
data partition without verity when a policy asks for exactly that. Activation of these images
is vm-tests/verity_guest.py's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import veritybuild as vb
from tests.conftest import Root, absent
from tests.integration.peer import REQUIRE_PEER, peer_dir
from tests.integration.test_verity_policy import (  # noqa: F401  (_basetemp: the fixture)
    PEER,
    _basetemp,
    loop_backing,
    needs_no_dm,
    refused,
    status,
    upstream_merge,
)

pytestmark = pytest.mark.root


def repart() -> Path:
    tool = peer_dir() / "bin/systemd-repart-sid"
    if not os.access(tool, os.X_OK):
        absent("no upstream systemd-repart", REQUIRE_PEER,
               f"run tools/peer.sh to build it in {peer_dir()}")
    return tool


def build(d: Path, name: str, designator: str, files: dict[str, str],
          key: vb.Key | None) -> vb.RepartDdi:
    ddi = vb.repart_ddi(repart(), d, name, designator, files, key)
    assert len(ddi.root_hash) == 64, ddi.partitions
    return ddi


class Images:
    def __init__(self, d: Path) -> None:
        self.keys = {n: vb.make_key(d / "keys", n) for n in ("alpha", "bravo")}
        self.usr_signed = build(d, "rpsig", "usr", {"usr/share/rp/rpsig": "rpsig\n"},
                                self.keys["alpha"])
        self.usr_unsigned = build(d, "rpver", "usr", {"usr/share/rp/rpver": "rpver\n"}, None)
        self.conf_signed = build(d, "rpconf", "root", {"etc/rp/rpconf.conf": "rpconf\n"},
                                 self.keys["alpha"])

    def place(self, root: Root, ddi: vb.RepartDdi, where: str = "var/lib/extensions") -> Path:
        (root / where).mkdir(parents=True, exist_ok=True)
        dest = root / where / ddi.image.name
        shutil.copy(ddi.image, dest)
        return dest

    def trust(self, root: Root, key: str) -> None:
        (root / "etc/verity.d").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.keys[key].cert, root / f"etc/verity.d/{key}.crt")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("repart-ddis"))


def test_repart_lays_out_the_partitions_as_the_specification_says(images: Images) -> None:
    """The facts overlayctl's reader relies on, as upstream's builder writes them: the data
    partition's UUID is the first half of the root hash, the verity partition's the second."""
    for ddi in (images.usr_signed, images.usr_unsigned, images.conf_signed):
        data, hash_ = ddi.partitions[0], ddi.partitions[1]
        h = ddi.root_hash
        assert str(data["uuid"]).replace("-", "") == h[:32]
        assert str(hash_["uuid"]).replace("-", "") == h[32:]


def test_list_reads_root_hash_and_signature_of_upstream_ddis(root: Root,
                                                             images: Images) -> None:
    images.place(root, images.usr_signed)
    images.place(root, images.usr_unsigned)
    images.place(root, images.conf_signed, "var/lib/confexts")
    images.trust(root, "alpha")
    rows = {x["name"]: x for x in
            json.loads(root.run("list", "--json=short", check=True).stdout)}
    assert {n: (rows[n]["class"], rows[n]["protection"], rows[n]["root_hash"])
            for n in rows} == {
        "rpsig": ("sysext", "signed", images.usr_signed.root_hash),
        "rpver": ("sysext", "verity", images.usr_unsigned.root_hash),
        "rpconf": ("confext", "signed", images.conf_signed.root_hash),
    }
    assert not any(r["refused"] for r in rows.values())


@needs_no_dm
@pytest.mark.parametrize("cls", ["sysext", "confext"])
def test_valid_upstream_signature_without_device_mapper_fails_as_upstream(
        root: Root, images: Images, cls: str) -> None:
    ddi = images.usr_signed if cls == "sysext" else images.conf_signed
    img = images.place(root, ddi, "var/lib/extensions" if cls == "sysext" else
                       "var/lib/confexts")
    images.trust(root, "alpha")
    if PEER is not None:
        assert upstream_merge(root, cls=cls) == (1, False)
    before = loop_backing()
    refused(root.run(cls, "merge"), str(img), "signature is valid", "CN=alpha",
            "device-mapper", ddi.root_hash[:16])
    assert root.mounts() == [] and loop_backing() == before


@needs_no_dm
def test_upstream_signature_by_an_untrusted_key_is_refused(root: Root, images: Images) -> None:
    img = images.place(root, images.usr_signed)
    images.trust(root, "bravo")
    before = loop_backing()
    line = refused(root.run("sysext", "merge"), str(img), "signature is refused")
    assert "signature is valid" not in line
    assert root.mounts() == [] and loop_backing() == before


def test_signed_only_policy_refuses_the_unsigned_upstream_ddi(root: Root,
                                                              images: Images) -> None:
    img = images.place(root, images.usr_unsigned)
    before = loop_backing()
    refused(root.run("sysext", "merge", "--image-policy=usr=signed+absent"), str(img),
            "usr=signed+absent")
    assert root.mounts() == [] and loop_backing() == before


@needs_no_dm
@pytest.mark.parametrize("cls", ["sysext", "confext"])
def test_unprotected_policy_mounts_the_data_partition(root: Root, images: Images,
                                                      cls: str) -> None:
    """Where upstream 262 fails on this kernel whatever the policy (it reads the image's
    metadata through dm-verity), overlayctl mounts the data partition without its verity data
    when the policy allows only that, and says so."""
    if cls == "sysext":
        images.place(root, images.usr_unsigned)
        policy, path, text, hier = "usr=unprotected", "usr/share/rp/rpver", "rpver\n", "/usr"
        name, designator = "rpver", "usr"
    else:
        images.place(root, images.conf_signed, "var/lib/confexts")
        policy, path, text, hier = "root=unprotected", "etc/rp/rpconf.conf", "rpconf\n", "/etc"
        name, designator = "rpconf", "root"
    if PEER is not None:
        assert upstream_merge(root, f"--image-policy={policy}", cls=cls) == (1, False)
    r = root.run(cls, "merge", f"--image-policy={policy}", check=True)
    try:
        assert "without its verity data" in r.stderr
        assert (root / path).read_text() == text
        prot = status(root)[hier]["protection"][name]
        assert prot["designator"] == designator and prot["protection"] == "unprotected"
    finally:
        root.run(cls, "unmerge", check=True)
    assert root.mounts() == []
