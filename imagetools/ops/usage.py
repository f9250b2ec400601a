"""The text of ``qimg --help`` (also printed by ``-h`` after any command)."""

from __future__ import annotations

SYNTAX = """\
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
"""

BODY = """\
Command parameters:
  'filename'     a disk image file name
  'fmt'          the image format; probed from the file's magic when omitted
                 (files without a known magic are raw: name the format with
                 -f for images a guest can write to)
  'output_fmt'   the format of a new image (raw if omitted)
  'options'      comma-separated name=value pairs for the format; '-o help'
                 lists them
  'size'         bytes, with an optional binary suffix k, M, G, T, P or E
                 (1024-based; 'b' means bytes); fractions such as 1.5G work
  'cache'        cache mode for writing: none, writeback, writethrough,
                 directsync or unsafe
  'src_cache'    the same for reading source images
  'snapshot_param' an internal snapshot: 'snapshot.id=ID,snapshot.name=NAME'
                 or just its ID or name
  '-p'           show progress (convert, compare, commit, rebase, amend)
  '-q'           quiet: print nothing but errors
  '-U'           open images shared (read-only use while another process
                 holds them)
  '--output'     human (default) or json

check: '-r leaks' repairs leaked clusters only, '-r all' repairs everything
  it can. Exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks only,
  63 the format cannot be checked.
compare: '-f'/'-F' name the formats of the first/second image; '-s' is
  strict mode (sizes and allocation must match too). Exit codes: 0 identical,
  1 different, 2 an image could not be opened.
convert: '-c' compresses the output (qcow2); '-S N' sets how many zero bytes
  in a row become a hole (default 4k, 0 writes everything); '-n' writes into
  an existing target; '-B' makes the output an overlay of a backing file.
snapshot: '-l' lists, '-c' creates, '-a' applies and '-d' deletes internal
  snapshots.
dd: 'bs=BYTES' block size (default 512), 'count=N' blocks to copy, 'skip=N'
  blocks to skip in the input, 'if=FILE' input, 'of=FILE' output.
"""


def help_text(prog: str) -> str:
    from imagetools.ops.common import format_names
    return (f"usage: {prog} [standard options] command [command options]\n"
            "Disk image utility (qemu-img 7.2 compatible)\n\n"
            "    '-h', '--help'       display this help and exit\n"
            "    '-V', '--version'    output version information and exit\n"
            "    '-T', '--trace'      accepted for compatibility; tracing is not supported\n\n"
            "Command syntax:\n" + SYNTAX + "\n" + BODY +
            "\nSupported formats: " + " ".join(format_names()) + "\n")
