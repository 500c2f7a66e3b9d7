from overlayctl.cli import main

raise SystemExit(main())
