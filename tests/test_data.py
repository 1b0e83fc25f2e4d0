import gzip
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ddpm.train.data import FILES, DataError, ensure_mnist, find_file, load_mnist, parse_idx, read_idx, write_idx


def test_real_mnist(mnist_dir):
    x, y = load_mnist(mnist_dir, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert y[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(y).tolist()[1] == 6742       # the well-known count of 1s in MNIST train
    xt, yt = load_mnist(mnist_dir, "test")
    assert xt.shape == (10000, 28, 28) and yt[:3].tolist() == [7, 2, 1]
    for name, md5 in FILES.items():   # the canonical content checksums we check downloads against
        assert hashlib.md5(gzip.decompress(find_file(mnist_dir, name).read_bytes())).hexdigest() == md5


def test_plain_and_gzip_roundtrip(tmp_path):
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b + b"\x00" * 3, "trailing garbage"),
    (lambda b: b"\x01" + b[1:], "bad magic"),
    (lambda b: b[:2] + b"\x42" + b[3:], "element type"),
    (lambda b: b[:6], "header truncated"),
    (lambda b: b"", "bad magic"),
])
def test_broken_files_give_clear_errors(tmp_path, mutate, message):
    a = np.zeros((3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "ok", a)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(mutate((tmp_path / "ok").read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        read_idx(bad)
    assert str(bad) in str(e.value)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))
    p.write_bytes(good[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(p)


@pytest.mark.parametrize("cut", [6, 12], ids=["in the gzip trailer", "in the deflate data"])
def test_a_damaged_file_says_what_to_do_once_and_bytes_without_a_file_do_not(tmp_path, cut):
    """A file's damage (here a truncated gzip) ends with the one hint of what to do (delete it, or point --data
    elsewhere); the same bytes parsed without a file (parse_idx, a download) have no file to delete."""
    data = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))[:-cut]
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(data)
    with pytest.raises(DataError, match=r"cannot read .*truncated\); delete it \(") as e:
        read_idx(p)
    assert str(e.value).count("delete it") == 1 and str(e.value).count("--data") == 1
    with pytest.raises(DataError, match="cannot read") as e:
        parse_idx(data, "downloaded")
    assert "delete it" not in str(e.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data):
    try:
        parse_idx(data, "x")
    except DataError:
        pass


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_parse_roundtrip(shape, seed):
    a = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    data = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes() + a.tobytes()
    assert np.array_equal(parse_idx(data), a)


def test_mismatched_images_and_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"labels has shape \(3,\), but N = 4 \(from images\)"):
        load_mnist(tmp_path)


def test_missing_files_without_network(tmp_path, monkeypatch):
    import ddpm.train.data as data

    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))   # nothing listens there
    with pytest.raises(DataError) as e:
        ensure_mnist(tmp_path, progress=lambda *_: None)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "--data" in msg and "Download failed" in msg
    with pytest.raises(DataError, match="--data"):
        ensure_mnist(tmp_path, download=False)


@pytest.mark.parametrize("kind, said", [("folder", "is a folder, not a file"), ("pipe", "is a pipe, not a file"),
                                         ("dangling link", "which does not exist")])
@pytest.mark.parametrize("at", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_something_else_at_an_mnist_name_is_named_not_downloaded_over(tmp_path, monkeypatch, kind, said, at):
    """A folder, a pipe or a dangling link standing at an MNIST file's name (plain or .gz) is said to be what it is,
    by ensure_mnist (no download is tried over it) and load_mnist, instead of "missing"."""
    import os

    import ddpm.train.data as data

    def fetch(*args):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(data, "_fetch", fetch)
    rng = np.random.default_rng(0)
    for name in FILES:
        if name != "t10k-images-idx3-ubyte":
            shape = (8,) if "labels" in name else (8, 28, 28)
            write_idx(tmp_path / f"{name}.gz", rng.integers(0, 10 if "labels" in name else 256, shape))
    where = tmp_path / at
    {"folder": where.mkdir, "pipe": lambda: os.mkfifo(where),
     "dangling link": lambda: where.symlink_to(tmp_path / "nothing")}[kind]()
    for call in (lambda: ensure_mnist(tmp_path, progress=lambda *_: None), lambda: load_mnist(tmp_path, "test")):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value).startswith(f"{where} ") and said in str(e.value), str(e.value)
        assert "files missing" not in str(e.value), str(e.value)


def test_download_checks_md5(tmp_path, monkeypatch):
    """A mirror serving wrong content is rejected by the MD5 check and nothing is written."""
    import http.server
    import threading
    import ddpm.train.data as data

    served = tmp_path / "srv"
    served.mkdir()
    for name in FILES:
        (served / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(data, "MIRRORS", (f"http://127.0.0.1:{httpd.server_address[1]}/",))
        with pytest.raises(DataError, match="MD5 mismatch"):
            ensure_mnist(tmp_path / "dl", progress=lambda *_: None)
        assert not any((tmp_path / "dl").glob("*.gz")) if (tmp_path / "dl").exists() else True
    finally:
        httpd.shutdown()


def test_download_from_mirror(tmp_path, monkeypatch, mnist_dir):
    """The download path for real: the real files served on loopback, fetched, MD5-checked, then readable."""
    import http.server
    import threading
    import ddpm.train.data as data

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(mnist_dir), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/", f"http://127.0.0.1:{httpd.server_address[1]}/"))
        ensure_mnist(tmp_path, progress=lambda *_: None)
    finally:
        httpd.shutdown()
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (10000, 28, 28) and y[0] == 7


@pytest.mark.parametrize("kind", ["file", "device", "loop", "link to nothing on its path", "url"])
def test_an_mnist_folder_that_cannot_be_one_says_why_before_any_download(tmp_path, monkeypatch, kind):
    """--data / $DDPM_DATA that is a file, /dev/null, a loop of links, a folder under a link to nothing, or a URL:
    one DataError that says what the path is, before anything is downloaded (it said "downloading ... into PATH",
    then a network error)."""
    import os

    import ddpm.train.data as data

    monkeypatch.setattr(data, "_fetch", lambda *a: pytest.fail("a download was tried"))
    path = {"file": tmp_path / "f", "device": os.devnull, "loop": tmp_path / "l", "url": "https:/example.com/mnist",
            "link to nothing on its path": tmp_path / "cache" / "ddpm" / "mnist"}[kind]
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "l", tmp_path / "l")
    os.symlink(tmp_path / "gone", tmp_path / "cache")
    want = {"file": "f is not a folder", "device": "/dev/null is not a folder", "loop": "is a loop of symbolic links",
            "url": "is a URL, not a folder", "link to nothing on its path": f"is a symbolic link to {tmp_path / 'gone'}"}
    for call in (lambda: ensure_mnist(path, download=True, progress=lambda m: None), lambda: load_mnist(path)):
        with pytest.raises(DataError) as e:
            call()
        assert want[kind] in str(e.value) and "--data" in str(e.value), str(e.value)


def test_mnist_is_not_downloaded_where_it_cannot_be_written(monkeypatch):
    """A missing MNIST folder whose files cannot be created (here under /proc, as a read-only cache folder): one
    DataError that says so, before a download is tried."""
    import os

    import ddpm.train.data as data

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux)")
    monkeypatch.setattr(data, "_fetch", lambda *a: pytest.fail("a download was tried"))
    with pytest.raises(DataError, match="cannot be downloaded there .*cannot create files in /proc"):
        ensure_mnist(data.Path("/proc/ddpm-no-such-mnist"), download=True, progress=lambda m: None)


def test_a_cache_folder_under_a_link_to_nothing_says_so(tmp_path, monkeypatch):
    """$XDG_CACHE_HOME a symbolic link to nothing: the export cache's line names the link (it said "File exists")."""
    import os

    from ddpm.export.cache import locked
    from ddpm.files import OutputError

    os.symlink(tmp_path / "gone", tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(OutputError) as e:
        with locked(tmp_path / "cache" / "ddpm" / "exports" / "0123"):
            pass
    assert f"{tmp_path / 'cache'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in str(e.value)
    assert "File exists" not in str(e.value)
