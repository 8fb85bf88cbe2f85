"""The names and paths an output folder can hold: a category or reference stem as one folder name,
an output's whole path within the file system's limits."""
from __future__ import annotations

import os
import re
from pathlib import Path

NAME_MAX_BYTES = 255  # one file or folder name (ext4, xfs, btrfs, NTFS, APFS)
PATH_MAX_BYTES = 4095  # a whole path (Linux PATH_MAX, less its terminating NUL)
# A category or stem names a folder and, in the review page's cache, `<stem>.thumb.jpg`: it may take
# what a name can hold less the longest suffix the product adds to it.
MAX_COMPONENT_BYTES = NAME_MAX_BYTES - 15


def path_length_problem(path: Path) -> str | None:
    """Why the file system cannot hold `path` (a name over 255 bytes, a path over 4095), or None."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX_BYTES:
            return (f"has a name of {len(os.fsencode(part))} bytes (`{part[:40]}…`); "
                    f"file systems allow {NAME_MAX_BYTES}")
    if len(os.fsencode(str(path))) > PATH_MAX_BYTES:
        return f"is {len(os.fsencode(str(path)))} bytes long; paths may have {PATH_MAX_BYTES}"
    return None


# What Windows (and so SMB shares, exFAT/FAT USB disks) refuses in a name (`:` is also the separator of
# macOS's Finder), and control characters, which break terminals and most tools.
UNPORTABLE_CHARACTERS = re.compile(r'[<>:"|?*\\\x00-\x1f\x7f]')


def portable_name_problem(part: str, folder: bool = True) -> str | None:
    """Why one file or folder name of an output path breaks on common file systems (Windows, SMB
    shares, macOS, FAT/exFAT disks) or hides among the sweep's own files, or None. The one rule for
    a category name (a folder of the default layout, checked as the manifest is read) and for each
    part of a name an `output.name` template makes."""
    if UNPORTABLE_CHARACTERS.search(part):
        return ("has a character that Windows, SMB shares or FAT/exFAT disks refuse (`<>:\"|?*\\` or a "
                "control character)")
    if folder and part and part[-1] in ". ":  # (a file's name ends in `.mp4`)
        return "ends with a dot or a space, which Windows drops"
    if part.startswith("."):
        return "starts with `.` (hidden; the sweep's own files start so)"
    return None


def safe_component_problem(name: str) -> str | None:
    """Why `name` cannot be one folder/file name under the output folder, or None when it can."""
    if not name or name.strip() != name:
        return "is empty or has leading/trailing spaces"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes that are not UTF-8 (or a lone surrogate)
        return "is not UTF-8 text (a byte or surrogate no text can hold: the sidecars and ids cannot name it)"
    if len(os.fsencode(name)) > MAX_COMPONENT_BYTES:
        return (f"is {len(os.fsencode(name))} bytes long (at most {MAX_COMPONENT_BYTES}: a file name may "
                f"have {NAME_MAX_BYTES}, and the product adds up to {NAME_MAX_BYTES - MAX_COMPONENT_BYTES})")
    if name in (".", "..") or ".." in name.split(os.sep):
        return "would escape the output folder (`..`)"
    if "/" in name or "\\" in name or os.path.isabs(name):
        return "contains a path separator or is an absolute path"
    if "\x00" in name or any(ord(ch) < 32 for ch in name):
        return "contains control characters"
    return None
