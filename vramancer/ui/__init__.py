"""Live views of a telemetry Recorder: the terminal monitor (tui.py, textual), the web dashboard
(web/, FastAPI + vendored uPlot), the desktop window (qt.py, PySide6 + pyqtgraph), and the texts
they share (view.py). Each toolkit is imported only by the subcommand that needs it
(commands/monitor.py, commands/dashboard.py, commands/gui.py)."""
