"""Faults in the files a run reads: broken downloads, hostile archives, odd and broken images.

Downloads never reach the network: urllib.request.urlopen is replaced by a server stand-in
that sends the bytes it is given and then breaks the way real connections break.
"""
import hashlib
import http.client
import io
import os
import re
import stat
import tarfile
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

import voc
from conftest import write_voc_tree
from downloads import download, extract, interrupted_extraction
from util import DSDLError, eval_transform
from voc import VOC2007


class Response:
    """What urlopen returns: `body` in blocks, announcing `length` bytes, then `end`.

    `end` None closes the connection cleanly (a short body just stops, as http.client does),
    otherwise it is the exception that the read after the body raises.
    """

    def __init__(self, body, length=None, end=None):
        self.stream = io.BytesIO(body)
        self.headers = {"Content-Length": str(length)} if length is not None else {}
        self.end = end

    def read(self, size):
        block = self.stream.read(min(size, 1000))
        if not block and self.end is not None:
            raise self.end
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def serve(monkeypatch, responses):
    """urlopen answers each url with responses[url]; any other url is an error."""
    def urlopen(url, timeout=None):
        if url not in responses:
            raise AssertionError(f"unexpected download of {url}")
        return responses[url]()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


DATA = np.random.default_rng(0).bytes(10_000)
MD5 = hashlib.md5(DATA).hexdigest()
CORRUPTED = DATA[:5000] + bytes([DATA[5000] ^ 1]) + DATA[5001:]
BROKEN_DOWNLOADS = {
    # name: (response, md5 given to download, what the message says)
    "cut short, checksum known": (lambda: Response(DATA[:4000]), MD5, "checksum mismatch"),
    "cut short, length announced": (lambda: Response(DATA[:4000], length=len(DATA)), None,
                                    f"cut short (4000 of {len(DATA)} bytes)"),
    "connection reset": (lambda: Response(DATA[:4000], length=len(DATA),
                                          end=ConnectionResetError(104, "Connection reset by peer")),
                         MD5, "Connection reset by peer"),
    "connection cut mid-chunk": (lambda: Response(DATA[:4000], length=len(DATA),
                                                  end=http.client.IncompleteRead(b"", 6000)),
                                 MD5, "IncompleteRead"),
    "corrupted": (lambda: Response(CORRUPTED, length=len(DATA)), MD5, "checksum mismatch"),
}


@pytest.mark.parametrize("fault", BROKEN_DOWNLOADS)
def test_a_cut_or_corrupted_download_is_caught_removed_and_explained(tmp_path, monkeypatch, fault):
    response, md5, reason = BROKEN_DOWNLOADS[fault]
    url = "https://example.org/archive.tar"
    serve(monkeypatch, {url: response})
    path = str(tmp_path / "archive.tar")
    with pytest.raises(DSDLError) as error:
        download(url, path, md5)
    message = str(error.value)
    assert url in message and reason in message and "removed" in message
    assert "Run the same command again to retry" in message and path in message  # what to do
    assert os.listdir(tmp_path) == []  # no partial file, nothing that looks downloaded


def test_a_download_that_fails_on_one_mirror_is_taken_whole_from_the_next(tmp_path, monkeypatch):
    first, second = "https://one.example.org/a.tar", "https://two.example.org/a.tar"
    serve(monkeypatch, {first: lambda: Response(DATA[:4000], length=len(DATA)),
                        second: lambda: Response(DATA, length=len(DATA))})
    path = str(tmp_path / "a.tar")
    assert download([first, second], path, MD5) == path
    assert open(path, "rb").read() == DATA and os.listdir(tmp_path) == ["a.tar"]


def voc_test_archive(folder, count=8):
    """A VOCtest-like tar (VOCdevkit/VOC2007/...) of a tiny test split; returns (path, md5, ids)."""
    tree = folder / "tree"
    written = write_voc_tree(str(tree), splits={"test": count}, seed=5)
    path = folder / "VOCtest_06-Nov-2007.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(tree / "VOCdevkit", arcname="VOCdevkit")
    with open(path, "rb") as f:
        return str(path), hashlib.md5(f.read()).hexdigest(), written["test"]


def test_a_dataset_whose_download_is_corrupted_is_left_absent_then_fetched_whole(tmp_path, monkeypatch):
    archive, md5, (ids, flags) = voc_test_archive(tmp_path / "server")
    monkeypatch.setitem(voc.VOC2007_ARCHIVES, "test", ("VOCtest_06-Nov-2007.tar", md5))
    content = open(archive, "rb").read()
    urls = [mirror + "VOCtest_06-Nov-2007.tar" for mirror in voc.MIRRORS]
    broken = content[:len(content) // 2] + bytes(len(content) - len(content) // 2)  # zeros
    serve(monkeypatch, {url: lambda: Response(broken, length=len(content)) for url in urls})
    root = tmp_path / "data"
    with pytest.raises(DSDLError) as error:
        VOC2007(str(root), "test")
    message = str(error.value)
    assert message.count("checksum mismatch") == len(urls) and "VOCdevkit" in message
    assert os.listdir(root) == []  # no archive, no .part, no half tree

    serve(monkeypatch, {urls[0]: lambda: Response(content, length=len(content))})
    dataset = VOC2007(str(root), "test")
    assert dataset.image_ids == ids and (dataset.labels == flags).all()
    assert all(dataset[i][0].size == (64, 64) for i in range(len(dataset)))


# ---- archives: path checks, broken archives, interrupted extraction -------------------------------

def tar_with(path, member):
    """A tar holding a harmless file, then the hostile `member` (a TarInfo)."""
    with tarfile.open(path, "w") as tar:
        harmless = tarfile.TarInfo("VOCdevkit/harmless.txt")
        harmless.size = 2
        tar.addfile(harmless, io.BytesIO(b"ok"))
        tar.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)


def file_member(name):
    member = tarfile.TarInfo(name)
    member.size = 4
    return member


def link_member(name, target, kind):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


def zip_with(path, name, link=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("VOCdevkit/harmless.txt", b"ok")
        info = zipfile.ZipInfo(name)
        if link:  # a symbolic link as Info-ZIP stores it: the mode says link, the data is the target
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"../../outside" if link else b"evil")


HOSTILE_ARCHIVES = {
    "tar ../": lambda path, out: tar_with(path, file_member("../evil.txt")),
    "tar nested ../": lambda path, out: tar_with(path, file_member("VOCdevkit/../../evil.txt")),
    "tar absolute path": lambda path, out: tar_with(path, file_member(os.path.join(out, "evil.txt"))),
    "tar symlink": lambda path, out: tar_with(path, link_member("VOCdevkit/link", out, tarfile.SYMTYPE)),
    "tar hard link": lambda path, out: tar_with(path, link_member("VOCdevkit/hard", os.path.join(out, "x"),
                                                                  tarfile.LNKTYPE)),
    "tar device file": lambda path, out: tar_with(path, link_member("VOCdevkit/dev", "", tarfile.CHRTYPE)),
    "zip ../": lambda path, out: zip_with(path, "../evil.txt"),
    "zip absolute path": lambda path, out: zip_with(path, os.path.join(out, "evil.txt")),
    "zip symlink": lambda path, out: zip_with(path, "VOCdevkit/link", link=True),
}


@pytest.mark.parametrize("kind", HOSTILE_ARCHIVES)
def test_an_archive_member_that_would_land_outside_the_target_is_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("a file a hard link could reach")
    archive = str(tmp_path / ("hostile.zip" if kind.startswith("zip") else "hostile.tar"))
    HOSTILE_ARCHIVES[kind](archive, str(outside))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DSDLError, match="refusing"):
        extract(archive, str(target))
    assert os.listdir(target) == []  # not even the harmless member, no staging folder
    assert sorted(os.listdir(outside)) == ["x"] and (outside / "x").read_text().startswith("a file")
    assert sorted(os.listdir(tmp_path)) == sorted(["outside", "target", os.path.basename(archive)])


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_truncated_archive_is_an_error_that_says_to_download_it_again(tmp_path, kind):
    archive, _, _ = voc_test_archive(tmp_path / "server")
    if kind == "zip":
        archive = str(tmp_path / "server" / "test.zip")
        with zipfile.ZipFile(archive, "w") as zf:
            for folder, _, files in os.walk(tmp_path / "server" / "tree"):
                for name in files:
                    zf.write(os.path.join(folder, name))
    with open(archive, "rb") as f:
        content = f.read()
    with open(archive, "wb") as f:
        f.write(content[:len(content) * 2 // 3])
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DSDLError, match="(?s)" + re.escape(archive) + " is not a valid archive .*download it again"):
        extract(archive, str(target))
    assert os.listdir(target) == []


def test_an_extraction_cut_short_is_not_taken_for_a_complete_dataset(tmp_path, monkeypatch):
    """Ctrl-C (or a kill) while the extracted files are moved in place: the next run sees the
    unfinished extraction and redoes it from the archive, instead of using half a dataset."""
    root = tmp_path / "data"
    root.mkdir()
    archive, md5, (ids, flags) = voc_test_archive(tmp_path / "server")
    os.replace(archive, root / os.path.basename(archive))
    monkeypatch.setitem(voc.VOC2007_ARCHIVES, "test", ("VOCtest_06-Nov-2007.tar", md5))
    serve(monkeypatch, {})  # the archive is there: no download
    moved, replace = [], os.replace

    def interrupted_replace(source, destination):
        if len(moved) == len(ids) // 2:
            raise KeyboardInterrupt
        moved.append(destination)
        replace(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", interrupted_replace)
        with pytest.raises(KeyboardInterrupt):
            VOC2007(str(root), "test")
    assert moved and interrupted_extraction("VOCtest_06-Nov-2007.tar", str(root))
    dataset = VOC2007(str(root), "test")
    assert dataset.image_ids == ids and (dataset.labels == flags).all()
    assert all(dataset[i][0].size == (64, 64) for i in range(len(dataset)))
    assert not interrupted_extraction("VOCtest_06-Nov-2007.tar", str(root))


# ---- images ----------------------------------------------------------------------------------

def image_path(root, image_id):
    return os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", image_id + ".jpg")


def truncated(path):
    with open(path, "rb") as f:
        content = f.read()
    return content[:len(content) // 2]


BROKEN_IMAGES = {
    "truncated JPEG": truncated,
    "empty file": lambda path: b"",
    "HTML error page": lambda path: b"<html><body>403 Forbidden</body></html>",
    "text file": lambda path: b"000001 1\n000002 -1\n",
}


@pytest.mark.parametrize("fault", BROKEN_IMAGES)
def test_a_truncated_or_non_image_file_is_an_error_naming_it(voc_root, fault):
    root, written = voc_root
    path = image_path(root, written["test"][0][0])
    content = BROKEN_IMAGES[fault](path)
    with open(path, "wb") as f:
        f.write(content)
    dataset = VOC2007(root, "test", eval_transform(64), download=False)
    with pytest.raises(DSDLError, match=re.escape(path) + r".*truncated or not an image"):
        dataset[0]


def test_grey_cmyk_and_png_in_jpg_files_load_as_rgb(voc_root):
    root, written = voc_root
    ids = written["test"][0]
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)
    colours = np.repeat(np.repeat(colours[::8, ::8], 8, axis=0), 8, axis=1)  # flat 8 x 8 blocks
    grey = Image.fromarray(colours).convert("L")
    grey.save(image_path(root, ids[0]), format="JPEG", quality=95)
    Image.fromarray(colours).convert("CMYK").save(image_path(root, ids[1]), format="JPEG", quality=95)
    Image.fromarray(colours).save(image_path(root, ids[2]), format="PNG")  # PNG bytes, .jpg name
    Image.fromarray(colours).convert("P").save(image_path(root, ids[3]), format="PNG")  # palette
    dataset = VOC2007(root, "test", download=False)
    expected = [np.repeat(np.asarray(grey)[..., None], 3, axis=2), colours, colours,
                np.asarray(Image.fromarray(colours).convert("P").convert("RGB"))]
    for index, (pixels, tolerance) in enumerate(zip(expected, [3, 6, 0, 0])):
        image = dataset[index][0]
        assert image.mode == "RGB" and image.size == (40, 48)
        difference = np.abs(np.asarray(image, dtype=int) - pixels.astype(int)).mean()
        assert difference <= tolerance, (index, difference)
    tensors = VOC2007(root, "test", eval_transform(64), download=False)
    assert all(tensors[i][0].shape == (3, 64, 64) for i in range(4))
