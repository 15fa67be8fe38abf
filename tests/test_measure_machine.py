from cskd.measure import machine


def test_cpuinfo_reads_the_first_processor(tmp_path):
    text = ("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n\n"
            "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    (tmp_path / "cpuinfo").write_text(text)
    info = machine._cpuinfo(tmp_path / "cpuinfo")
    assert info["model name"] == "Example CPU 9000"
    assert machine.vector_extensions(info["flags"]) == ["avx", "avx2", "fma", "avx512f", "avx512_vnni"]


def test_vector_extensions_match_whole_flags_only():
    # "avx512f" must not count as "avx" by prefix, nor "avx512_vnni" without its own flag.
    assert machine.vector_extensions("sse avx512f avx512vnni") == ["avx512f"]
    assert machine.vector_extensions("") == []


def test_describe_names_the_cpu_and_a_line_for_tables(tmp_path):
    described = machine.describe()
    assert described["cpu"] and described["cores"] >= 1
    line = machine.one_line({"cpu": "Example", "vector": [], "cores": 2})
    assert line == "Example (no AVX), 2 cores"


def test_missing_cpuinfo_is_no_error(tmp_path):
    assert machine._cpuinfo(tmp_path / "absent") == {}
