"""Small runnable programs that show the parallel pieces at work (``tedmoe demo``)."""
