"""Who runs the worker loops: `local` starts them as processes on this machine."""
