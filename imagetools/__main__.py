from imagetools.cli import main

raise SystemExit(main())
