"""Write a folder of images into an LMDB data set, one JPEG per image and size.

    python prepare_data.py --size 256 --out data/celeba_256 PATH_TO_IMAGES
    python prepare_data.py --size 128,256 --n_worker 8 --out data/celeba PATH_TO_IMAGES

PATH may be a flat folder or hold sub-folders; files are indexed in the order of their relative
paths. Images are resized on the short side and centre-cropped (see lmdb_data.py for the format).
"""
import argparse
import functools
import os
import shutil
import sys
from multiprocessing import Pool

import lmdb
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def fail(message, status=2):
    """Report a user mistake on one line and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)")


def str2bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def size_list(text):
    sizes = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in sizes):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}")
    return sorted(set(map(int, sizes)))


def positive_int(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv=None):
    parser = Parser(description="Write a folder of images into an LMDB data set.")
    parser.add_argument("--out", required=True, help="folder of the LMDB data set to write")
    parser.add_argument("--size", type=size_list, default="128,256,512,1024",
                        help="image sizes to write, comma-separated (default: %(default)s)")
    parser.add_argument("--n_worker", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and resize images (1: no pool)")
    parser.add_argument("--resample", choices=sorted(RESAMPLE), default="lanczos",
                        help="resampling filter for resizing (default: %(default)s)")
    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="replace a complete data set already at --out (True/False)")
    parser.add_argument("path", help="folder of images, flat or with sub-folders")
    return parser.parse_args(argv)


def find_images(root):
    """Image files under `root`, sorted by relative path; hidden files and folders are ignored."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def encode_all(encode, paths, n_worker):
    """Yield encode(path) for each path in order, from a pool of n_worker processes if > 1."""
    if n_worker == 1:
        yield from map(encode, paths)
        return
    with Pool(n_worker) as pool:
        yield from pool.imap(encode, paths, chunksize=4)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.path):
        what = "is not a folder" if os.path.exists(args.path) else "not found"
        fail(f"image folder {args.path} {what}")
    files = find_images(args.path)
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {args.path}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} exists and is not a folder")

    # Imported only now, so that a mistyped command fails at once instead of after torch
    # (needed by the data set reader in the same module) has loaded.
    from lmdb_data import LMDBWriter, encode_file, image_key, read_length

    try:
        existing = read_length(args.out)
    except lmdb.Error as error:
        fail(f"--out {args.out} holds an unreadable LMDB ({error}); "
             f"remove it or choose another --out")
    if existing is not None and not args.overwrite:
        fail(f"--out {args.out} already holds a complete data set of {existing} images; "
             f"pass --overwrite True to replace it")

    encode = functools.partial(encode_file, sizes=args.size, resample=RESAMPLE[args.resample])
    written = skipped = 0
    paths = [os.path.join(args.path, name) for name in files]
    # Written beside --out and swapped in only when complete: an existing data set survives a failed run.
    partial = os.path.normpath(args.out) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with LMDBWriter(partial) as writer:
            results = encode_all(encode, paths, args.n_worker)
            for name, (encoded, reason) in zip(paths, tqdm(results, total=len(paths), unit="img")):
                if encoded is None:
                    tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)
                    skipped += 1
                    continue
                for size, data in zip(args.size, encoded):
                    writer.put(image_key(size, written), data)
                written += 1
            if written == 0:
                fail(f"none of the {len(files)} images in {args.path} could be read", status=1)
            writer.finish(written)
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        os.replace(partial, args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    sizes = ", ".join(map(str, args.size))
    print(f"wrote {written} images ({skipped} skipped) at sizes {sizes} to {args.out}")


if __name__ == "__main__":
    main()
