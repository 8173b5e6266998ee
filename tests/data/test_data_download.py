"""Checksum verification and atomic downloads, over local file:// URLs and a refused local port (no network)."""

from __future__ import annotations

import pytest

from sharpscope.data.download import RemoteFile, download_file, download_files, file_digest, verify_file
from sharpscope.errors import SharpscopeError

# Standard test vectors (RFC 1321 appendix A.5; FIPS 180-2 appendix B.1).
MD5_EMPTY = "d41d8cd98f00b204e9800998ecf8427e"
MD5_ABC = "900150983cd24fb0d6963f7d28e17f72"
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_file_digest_known_vectors(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "abc").write_bytes(b"abc")
    assert file_digest(tmp_path / "empty", "md5") == MD5_EMPTY
    assert file_digest(tmp_path / "abc", "md5") == MD5_ABC
    assert file_digest(tmp_path / "abc") == SHA256_ABC


def test_verify_file(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    verify_file(path, md5=MD5_ABC, sha256=SHA256_ABC.upper())  # hex case does not matter
    with pytest.raises(SharpscopeError, match=rf"abc: md5 is {MD5_ABC}, expected {MD5_EMPTY}; the file is corrupt"):
        verify_file(path, md5=MD5_EMPTY)
    with pytest.raises(SharpscopeError, match=r"abc: sha256 is ba7816.*, expected 0+; .*delete it and download"):
        verify_file(path, sha256="0" * 64)
    with pytest.raises(SharpscopeError, match=r"cannot verify .*nope: no such file"):
        verify_file(tmp_path / "nope", md5=MD5_ABC)
    with pytest.raises(SharpscopeError, match=r"give md5= or sha256="):
        verify_file(path)


def test_download_file_url(tmp_path):
    source = tmp_path / "server" / "data.bin"
    source.parent.mkdir()
    payload = bytes(range(256)) * 5000  # 1.28 MB: several 1 MiB blocks
    source.write_bytes(payload)
    remote = RemoteFile("data.bin", source.as_uri(), md5=file_digest(source, "md5"))
    dest = download_file(remote, tmp_path / "cache", progress=False)
    assert dest == tmp_path / "cache" / "data.bin" and dest.read_bytes() == payload
    # already there and verified: kept without fetching (the source may be gone)
    source.unlink()
    assert download_files([remote], tmp_path / "cache", progress=False) == [dest]


def test_download_checksum_mismatch_writes_nothing(tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(b"abc")
    remote = RemoteFile("data.bin", source.as_uri(), md5=MD5_EMPTY)
    with pytest.raises(SharpscopeError, match=rf"download of file://.*data.bin: md5 is {MD5_ABC}, expected "
                                              rf"{MD5_EMPTY}; nothing was written"):
        download_file(remote, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no destination, no temporary left behind


def test_download_replaces_a_stale_file(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "abc").write_bytes(b"ab")  # an interrupted copy from elsewhere
    dest = download_file(RemoteFile("abc", (tmp_path / "abc").as_uri(), md5=MD5_ABC), tmp_path / "cache",
                         progress=False)
    assert dest.read_bytes() == b"abc"


@pytest.mark.parametrize("url", ["file:///nonexistent/sharpscope/x.tar.gz", "http://127.0.0.1:9/x.tar.gz"],
                         ids=["missing-file", "refused-connection"])
def test_download_failure_says_where_to_put_the_file(tmp_path, url):
    with pytest.raises(SharpscopeError, match=rf"could not download {url} \(.*\); fetch it by hand and put it at "
                                              rf"{tmp_path / 'cache' / 'x.tar.gz'}$"):
        download_file(RemoteFile("x.tar.gz", url, md5=MD5_EMPTY), tmp_path / "cache", progress=False, timeout=5)
