"""Lightning callbacks (merge check, export). Installed as `lowbit_ft.callbacks`."""
