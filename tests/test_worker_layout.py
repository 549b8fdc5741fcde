"""``worker.processes`` / ``worker.threads`` = "auto" (dicom_node/worker_layout.py): the rule on given CPUs, the
CPU read from /proc/cpuinfo as torch reads it, and the configuration's values and errors."""

from __future__ import annotations

import pytest

from dicom_node.config import ConfigError, load_config
from dicom_node.worker_layout import cpu_flags, resolve_layout

from .support.data import CONFIG

AMX = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
ZEN3 = frozenset({"avx2", "fma"})


def layout(processes="auto", threads="auto", precision="auto", device="auto", cores=2, flags=AMX):
    chosen = resolve_layout(processes, threads, precision, device, cores=cores, flags=flags)
    return chosen.processes, chosen.threads


def test_amx_cpus_get_two_processes_of_one_thread_others_one_of_two():
    assert layout(flags=AMX) == (2, 1)
    assert layout(flags=ZEN4) == (1, 2)  # bfloat16 without AMX: one thread not measured there
    assert layout(flags=ZEN3) == (1, 2)
    assert layout(flags=frozenset()) == (1, 2)  # nothing known about the CPU: the layout that keeps idle latency


def test_a_float32_classifier_or_a_gpu_keeps_one_process_of_two_threads():
    assert layout(precision="fp32") == (1, 2)
    assert layout(precision="bf16", flags=ZEN3) == (1, 2)  # emulated bfloat16 is slow: no reason for one thread
    assert layout(precision="bf16", flags=AMX) == (2, 1)
    assert layout(device="cuda") == (1, 2)


def test_never_more_than_the_cores_and_numbers_given_are_kept():
    assert layout(cores=1, flags=AMX) == (1, 1)
    assert layout(cores=1, flags=ZEN3) == (1, 1)
    assert layout(cores=16, flags=AMX) == (2, 1)  # more cores: the README's sizing, set by hand
    assert layout(processes=3, flags=AMX) == (3, 1)
    assert layout(threads=4, flags=AMX) == (2, 4)
    assert layout(processes=0, threads=0, flags=ZEN3) == (0, 0)
    assert "bfloat16" in resolve_layout("auto", "auto", "auto", "cpu", 2, AMX).reason
    assert "no AMX" in resolve_layout("auto", "auto", "auto", "cpu", 2, ZEN3).reason
    assert "float32" in resolve_layout("auto", "auto", "fp32", "cpu", 2, AMX).reason
    assert "GPU" in resolve_layout("auto", "auto", "auto", "cuda", 2, AMX).reason


def test_cpu_flags_come_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_cpu_is_read_as_torch_reads_it():
    """The layout (decided in serve, without torch) and the classifier's precision (decided in the worker, by
    torch's CPUID probes) agree on whether this CPU has AMX."""
    from ai.precision import bfloat16_hardware

    fast = resolve_layout("auto", "auto", "auto", "cpu", cores=2).processes == 2
    assert fast == (bfloat16_hardware() == "AMX")


def test_auto_from_the_file_the_environment_and_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[worker]\nprocesses = "auto"\nthreads = 3\n')
    cfg = load_config(path, environ={})
    assert cfg.worker.threads == 3 and cfg.worker.processes in (1, 2)
    assert cfg.values["worker.processes"] == "auto"
    cfg = load_config(path, {"worker.threads": " Auto "}, environ={"DICOM_NODE_WORKER_PROCESSES": "4"})
    assert cfg.worker.processes == 4 and cfg.worker.threads in (1, 2)
    default = load_config(CONFIG, environ={})
    assert (default.worker.processes, default.worker.threads) in ((2, 1), (1, 2))


@pytest.mark.parametrize(("toml", "overrides", "message"), [
    ('[worker]\nprocesses = "several"\n', {}, 'worker.processes: expected int or "auto"'),
    ('[worker]\nprocesses = "2"\n', {}, 'worker.processes: expected int or "auto"'),
    ('', {"worker.threads": "-1"}, 'worker.threads: must be between 0 and 256, or "auto"'),
    ('', {"worker.processes": "auto2"}, 'worker.processes: expected int or "auto"'),
])
def test_bad_values_name_the_key_and_say_auto_is_allowed(tmp_path, toml, overrides, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(path, overrides, environ={})
