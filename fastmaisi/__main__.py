from fastmaisi.cli import main

raise SystemExit(main())
