"""The commands built on the library (`esrdistill quickstart | eval | diagnose | bench | sweep | study | lab | report |
launch`, and the GPU check): each reads its options, calls the library (build, train, evaluate, measure) and writes
its report. The library never imports from here (tests/test_layout.py)."""
