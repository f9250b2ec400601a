from imagetools.cli import run

run()
