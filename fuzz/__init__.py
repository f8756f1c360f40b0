"""atheris harnesses (`make fuzz`): the compiled ingest against the pure-Python reference.

Run inside the sanitized copy of the project (devtools.sanitized --kind fuzz) so that libFuzzer
sees the coverage of the C code; the checks themselves are devtools.fuzzing's.
"""
