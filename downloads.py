"""Downloads (md5 checked, never half-written) and safe extraction of the datasets' archives."""
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import urllib.request
import zipfile

from tqdm import tqdm

from util import DSDLError, make_folders


def md5sum(path, chunk=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(urls, path, md5=None):
    """Download the first of `urls` that works to `path`, with a progress bar.

    The bytes go to `path + '.part'` and are renamed only after the md5 matches, so a cut or
    corrupted download never looks complete; a bad partial file is removed.
    """
    if isinstance(urls, str):
        urls = [urls]
    make_folders(os.path.dirname(os.path.abspath(path)))  # removed again if the run fails
    partial = path + ".part"
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
                received = out.tell()
        # no network, HTTP error, timeout, disk full, connection cut (http.client.IncompleteRead)
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"{url}: {error}")
            if os.path.exists(partial):
                os.remove(partial)
                errors[-1] += "; the partial download has been removed"
            continue
        if total is not None and received != total:  # a connection closed early ends the stream
            os.remove(partial)
            errors.append(f"{url}: the download was cut short ({received} of {total} bytes) "
                          f"and has been removed")
            continue
        if md5 is not None and md5sum(partial) != md5:
            os.remove(partial)
            errors.append(f"{url}: checksum mismatch (expected md5 {md5}); the download was "
                          f"cut short or corrupted and has been removed")
            continue
        os.replace(partial, path)
        return path
    raise DSDLError(f"could not download {os.path.basename(path)} to {path}:\n  " + "\n  ".join(errors)
                    + f"\nRun the same command again to retry, or download it by hand and place it at "
                      f"{path}; check the network if it keeps failing.")


STAGING_PREFIX = ".extracting-"


def _check_member(target, name):
    resolved = os.path.realpath(os.path.join(target, name))
    if os.path.isabs(name) or os.path.commonpath([target, resolved]) != target:
        raise DSDLError(f"refusing archive member {name!r}: it would be written outside {target}")


def extract(archive, target):
    """Extract a .tar/.tar.gz/.zip into `target`, refusing members that escape it.

    Members with absolute paths, `..` that leads outside, and links are refused before anything
    is written; a file that already exists in `target` is kept, never overwritten. The archive
    is unpacked into a staging folder inside `target` and then moved in place; the staging
    folder is removed only once everything is in place, so an extraction cut short (killed,
    Ctrl-C) stays visible to `interrupted_extraction` and is redone instead of leaving a tree
    that looks whole.
    """
    target = os.path.realpath(target)
    staging = os.path.join(target, STAGING_PREFIX + os.path.basename(archive))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(staging, info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise DSDLError(f"refusing link {info.filename!r} in {archive}")
                zf.extractall(staging)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_member(staging, member.name)
                    if member.issym() or member.islnk():
                        raise DSDLError(f"refusing link {member.name!r} in {archive}")
                tf.extractall(staging, filter="data")
    except tarfile.FilterError as error:  # device files and the like
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"refusing a member of {archive}: {error}") from error
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"{archive} is not a valid archive ({error}); delete it and download "
                        f"it again") from error
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"could not extract {archive} into {target} ({error}); free disk space "
                        f"and run again") from error
    except DSDLError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Merge the staged tree into the target (archives like VOC's share top folders).
    for folder, _, files in os.walk(staging):
        destination = os.path.join(target, os.path.relpath(folder, staging))
        os.makedirs(destination, exist_ok=True)
        for name in files:
            if not os.path.exists(os.path.join(destination, name)):  # never over a user's file
                os.replace(os.path.join(folder, name), os.path.join(destination, name))
    shutil.rmtree(staging)


def fetch(archive, urls, md5, root, what, hint):
    """Make sure `archive` (a path in `root`) is there whole, downloading it when absent or
    when its md5 differs, and extract it into `root`. `what` names the data ("VOC 2007 test")
    and `hint` says how to put it in place by hand, in the error when the download fails."""
    if not (os.path.isfile(archive) and (md5 is None or md5sum(archive) == md5)):
        try:
            download(urls, archive, md5)
        except DSDLError as error:
            raise DSDLError(f"{what} is not in {root} and could not be downloaded.\n{error}\n"
                            f"{hint}") from error
    extract(archive, root)


def interrupted_extraction(archive, target):
    """Whether an extraction of `archive` (a name or path) into `target` was cut short (`extract`)."""
    return os.path.isdir(os.path.join(target, STAGING_PREFIX + os.path.basename(archive)))
