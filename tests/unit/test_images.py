"""tests.support.images: the busybox test image's archives, their cache, and one-line errors from failing
tools."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.images import IMAGE_NAME, IMAGE_REF, PAUSE_REF, PAUSE_SCRIPT, ImageError, busybox_archives


def test_missing_tool_is_one_line() -> None:
    with pytest.raises(ImageError, match=r"^no-such-tool-xyz not found: install it \(scripts/install.sh\)$"):
        images._tool("no-such-tool-xyz", "init")


def test_failing_tool_names_the_command_and_last_error_line() -> None:
    with pytest.raises(ImageError, match=r"^`sh -c` failed: second$"):
        images._tool("sh", "-c", "echo first >&2; echo second >&2; exit 3")


def _oci_config(archive: Path, ref: str) -> dict[str, Any]:
    """The image config of the oci-archive's only manifest, which must be named ``ref``."""
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> Any:
            return json.load(tar.extractfile("blobs/sha256/" + digest.split(":")[1]))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        [entry] = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == ref
        return blob(blob(entry["digest"])["config"]["digest"])  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("umoci") and shutil.which("skopeo")),
                    reason="needs root, umoci and skopeo")
def test_build_then_cached(tmp_path: Path) -> None:
    (tmp_path / "busybox-0000000000000000").mkdir()  # an entry for another busybox: removed
    first = busybox_archives(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.docker.parent.name]
    with tarfile.open(first.docker) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [IMAGE_REF]  # docker load shows it as IMAGE_NAME
    with tarfile.open(first.oci) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == IMAGE_REF
    assert IMAGE_REF.endswith(IMAGE_NAME)
    assert _oci_config(first.pause, PAUSE_REF)["config"]["Entrypoint"] == ["sh", "-c", PAUSE_SCRIPT]

    mtime = first.docker.stat().st_mtime_ns
    t0 = time.monotonic()
    again = busybox_archives(tmp_path)
    assert time.monotonic() - t0 < 0.5
    assert again == first
    assert first.docker.stat().st_mtime_ns == mtime
