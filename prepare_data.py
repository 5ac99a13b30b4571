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

from cli import ArgumentParser, UserError, int_list, main_guard, positive_int, str2bool

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def size_list(text):
    try:
        return sorted(set(int_list(text)))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected positive image sizes separated by commas, got {text!r}") from None


def parse_args(argv=None):
    parser = ArgumentParser(description="Write a folder of images into an LMDB data set.")
    parser.add_argument("--out", required=True, help="folder of the LMDB data set to write")
    parser.add_argument("--size", type=size_list, default="128,256,512,1024",
                        help="image sizes to write, comma-separated")
    parser.add_argument("--n_worker", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and resize images (1: no pool)")
    parser.add_argument("--resample", choices=sorted(RESAMPLE), default="lanczos",
                        help="resampling filter for resizing")
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


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.path):
        what = "is not a folder" if os.path.exists(args.path) else "not found"
        raise UserError(f"image folder {args.path} {what}")
    files = find_images(args.path)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {args.path}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a folder")

    # Imported only now, so that a mistyped command fails at once instead of after torch
    # (needed by the data set reader in the same module) has loaded.
    from lmdb_data import LMDBWriter, encode_file, image_key, read_length

    try:
        existing = read_length(args.out)
    except lmdb.Error as error:
        raise UserError(f"--out {args.out} holds an unreadable LMDB ({error}); "
             f"remove it or choose another --out")
    if existing is not None and not args.overwrite:
        raise UserError(f"--out {args.out} already holds a complete data set of {existing} images; "
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
                raise UserError(f"none of the {len(files)} images in {args.path} could be read")
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
