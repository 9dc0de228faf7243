from opstudio.cli import main

raise SystemExit(main())
