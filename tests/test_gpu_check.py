"""The CPU side of the GPU check (issue 16): CUDA build flags, GPU offload arguments, the check's
argument handling and its report, all without a GPU."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit import gpucheck, toolchain
from quantkit.errors import ToolchainError
from quantkit.cli import main
from quantkit.gpucheck import Tolerance, build_report, compare_scores, read_reference, summarize
from quantkit.proc import ToolRun
from quantkit.toolchain import Toolchain, arch_from_compute_caps, check_cuda_arch, cmake_args, cuda_architectures

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


# --- quantkit toolchain --cuda: CMake flags ------------------------------------------------------

def _flag(args: list[str], name: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"-D{name}=")]
    assert len(found) <= 1, f"{name} given twice: {args}"
    return found[0] if found else None


def test_cuda_flags_name_the_architecture():
    args = cmake_args(cuda=True, cuda_arch="90")
    assert _flag(args, "GGML_CUDA") == "ON"
    assert _flag(args, "CMAKE_CUDA_ARCHITECTURES") == "90"
    assert _flag(args, "GGML_NATIVE") == "OFF"
    assert _flag(args, "LLAMA_BUILD_COMMIT") == toolchain.PIN.commit


def test_cpu_flags_have_no_cuda():
    args = cmake_args(cuda=False)
    assert _flag(args, "GGML_CUDA") == "OFF"
    assert _flag(args, "CMAKE_CUDA_ARCHITECTURES") is None
    assert _flag(args, "GGML_NATIVE") == "ON"
    # Without an architecture the CUDA build keeps ggml's default list (the image's case).
    assert _flag(cmake_args(cuda=True), "CMAKE_CUDA_ARCHITECTURES") is None


def test_architecture_for_a_cpu_build_is_refused():
    with pytest.raises(ToolchainError, match="CPU build"):
        cmake_args(cuda=False, cuda_arch="90")


@pytest.mark.parametrize("good", ["90", "90a", "89-real", "80;90", "120a", "native", "all-major"])
def test_cmake_architecture_lists_accepted(good):
    assert check_cuda_arch(good) == good


@pytest.mark.parametrize("bad", ["9.0", "sm_90", "90;", "", "90 ", "90;$(id)", "compute_90", "7"])
def test_bad_architectures_refused(bad):
    with pytest.raises(ToolchainError, match="not a CMake CUDA_ARCHITECTURES list"):
        check_cuda_arch(bad)


@pytest.mark.parametrize("smi, arch", [("9.0\n", "90"), ("9.0\n9.0\n", "90"), ("8.0\n9.0\n", "80;90"),
                                       ("8.6", "86"), ("12.0\n", "120")])
def test_architecture_from_nvidia_smi(smi, arch):
    assert arch_from_compute_caps(smi) == arch


@pytest.mark.parametrize("smi", ["", "\n", "No devices were found\n", "9\n"])
def test_unreadable_nvidia_smi_is_an_error(smi):
    with pytest.raises(ToolchainError):
        arch_from_compute_caps(smi)


def _fake_smi(folder: Path, output: str, rc: int = 0) -> None:
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {rc}\n")
    smi.chmod(0o755)


def test_architecture_order_argument_env_detected(tmp_path, monkeypatch):
    _fake_smi(tmp_path, "9.0\\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(toolchain.ENV_CUDA_ARCH, raising=False)
    assert cuda_architectures() == "90"  # detected
    monkeypatch.setenv(toolchain.ENV_CUDA_ARCH, "89")
    assert cuda_architectures() == "89"  # env beats detection
    assert cuda_architectures("80") == "80"  # the argument beats both
    monkeypatch.setenv(toolchain.ENV_CUDA_ARCH, "sm90")
    with pytest.raises(ToolchainError):
        cuda_architectures()


def test_no_gpu_means_ggml_default_architectures(tmp_path, monkeypatch):
    monkeypatch.delenv(toolchain.ENV_CUDA_ARCH, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert cuda_architectures() is None
    _fake_smi(tmp_path, "NVIDIA-SMI has failed\\n", rc=9)
    assert cuda_architectures() is None


class _Configured(Exception):
    pass


def _fake_tree(folder: Path, monkeypatch) -> Path:
    """A 'source tree' whose converter the pin is pointed at, so nothing is fetched."""
    folder.mkdir(parents=True)
    (folder / "CMakeLists.txt").write_text("project(fake)\n")
    (folder / "convert_hf_to_gguf.py").write_text("# fake converter\n")
    digest = toolchain.sha256_file(folder / "convert_hf_to_gguf.py")
    monkeypatch.setattr(toolchain, "PIN", dataclasses.replace(toolchain.PIN, converter_sha256=digest))
    return folder


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """A CUDA toolkit as find_cuda_toolkit reports a full one (these tests stop at the configure step)."""
    kit = toolchain.CudaToolkit(nvcc=Path("/cuda/bin/nvcc"), root=Path("/cuda"), cublas_include=None,
                                cublas_lib=None, driver_lib=Path("/cuda/lib64/stubs/libcuda.so"))
    monkeypatch.setattr(toolchain, "find_cuda_toolkit", lambda env=None: kit)
    return kit


def test_cuda_build_uses_its_own_folder_the_carried_tree_and_the_arch(tmp_path, monkeypatch, fake_cuda):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    tree = _fake_tree(tmp_path / "carried", monkeypatch)
    commands = []

    def fake_run_tool(cmd, **kw):
        commands.append([os.fspath(c) for c in cmd])
        raise _Configured

    monkeypatch.setattr(toolchain, "run_tool", fake_run_tool)
    with pytest.raises(_Configured):
        toolchain.build_toolchain(cuda=True, cuda_arch="90", source=tree)
    configure = commands[0]
    build = tmp_path / "cache" / "llama.cpp" / f"{toolchain.PIN.commit}-cuda"
    assert configure[:5] == ["cmake", "-S", str(build / "src"), "-B", str(build / "cmake-build")]
    assert _flag(configure, "GGML_CUDA") == "ON" and _flag(configure, "CMAKE_CUDA_ARCHITECTURES") == "90"
    # The machine's toolkit is named by hints after the flags: the compiler and its libcuda.
    assert _flag(configure, "CMAKE_CUDA_COMPILER") == "/cuda/bin/nvcc"
    assert _flag(configure, "CUDA_cuda_driver_LIBRARY") == "/cuda/lib64/stubs/libcuda.so"
    assert (build / "src" / "convert_hf_to_gguf.py").read_text() == "# fake converter\n"
    assert not (tmp_path / "cache" / "llama.cpp" / f"{toolchain.PIN.commit}-cpu").exists()


def test_cuda_build_takes_the_cpu_cache_tree_before_pypi(tmp_path, monkeypatch, fake_cuda):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    cpu_src = tmp_path / "cache" / "llama.cpp" / f"{toolchain.PIN.commit}-cpu" / "src"
    _fake_tree(cpu_src, monkeypatch)
    monkeypatch.setattr(toolchain, "fetch_source", lambda dest: pytest.fail("went to PyPI"))
    monkeypatch.setattr(toolchain, "run_tool", lambda cmd, **kw: (_ for _ in ()).throw(_Configured()))
    with pytest.raises(_Configured):
        toolchain.build_toolchain(cuda=True, cuda_arch="90")
    assert (cpu_src.parent.parent / f"{toolchain.PIN.commit}-cuda" / "src" / "CMakeLists.txt").is_file()


def test_a_carried_tree_of_another_commit_is_refused(tmp_path, monkeypatch, fake_cuda):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "convert_hf_to_gguf.py").write_text("# another commit\n")
    monkeypatch.setattr(toolchain, "run_tool", lambda cmd, **kw: pytest.fail("built from the wrong tree"))
    with pytest.raises(ToolchainError, match="is not the llama.cpp .* source tree"):
        toolchain.build_toolchain(cuda=True, cuda_arch="90", source=other)


def test_quantkit_cuda_env_selects_the_cuda_toolchain(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(toolchain.ENV_BIN, raising=False)
    monkeypatch.delenv(toolchain.ENV_SRC, raising=False)
    monkeypatch.setenv(toolchain.ENV_CUDA, "1")
    with pytest.raises(ToolchainError, match=f"{toolchain.PIN.commit}-cuda"):
        toolchain.find_toolchain()
    with pytest.raises(ToolchainError, match=f"{toolchain.PIN.commit}-cpu"):
        toolchain.find_toolchain(cuda=False)


def test_cli_cuda_arch_needs_cuda(capsys):


    assert main(["toolchain", "--cuda-arch", "90"]) == 2
    assert capsys.readouterr().err.strip() == "error: --cuda-arch needs --cuda"


def test_cli_missing_cuda_toolchain_says_how_to_build_it(tmp_path, monkeypatch, capsys):


    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(toolchain.ENV_BIN, raising=False)
    monkeypatch.delenv(toolchain.ENV_SRC, raising=False)
    assert main(["toolchain", "--cuda"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"{toolchain.PIN.commit}-cuda" in lines[0]
    assert lines[-1] == "build it with: quantkit toolchain --build --cuda"


# --- GPU offload of the llama.cpp tools ----------------------------------------------------------

def _toolchain(cuda: bool) -> Toolchain:
    return Toolchain(src=Path("/src"), bin_dir=Path("/bin"), commit=toolchain.PIN.commit, origin="env", cuda=cuda)


def test_offload_args():
    assert _toolchain(True).offload_args() == ["-ngl", "999"]
    assert _toolchain(False).offload_args() == []


def test_numbers_from_a_cuda_build_have_their_own_store_keys():
    """A CPU worker's imatrix, scores, tasks and speed are not a GPU worker's (other sums, another machine's
    speed); the converted and quantized files are the same bytes, so their keys do not change."""
    from quantkit.calibration import CalibrationText
    from quantkit.convert import convert_inputs
    from quantkit.imatrix import imatrix_inputs
    from quantkit.quantize import quantize_inputs
    from quantkit.recipe import Evaluation, ImatrixSpec
    from quantkit.scoring.llamacpp import score_inputs
    from quantkit.source import ModelSnapshot
    from quantkit.store import Entry, FileRecord, Store

    base = Entry("convert", "k", Path("/s"), {}, {"model.gguf": FileRecord("b" * 64, 1)}, {})
    calib = CalibrationText("text", "c" * 64, ())
    keys = {}
    for cuda in (False, True):
        tc = _toolchain(cuda)
        keys[cuda] = [Store.key(d) for d in (
            imatrix_inputs(base=base, calibration=calib, spec=ImatrixSpec(), toolchain=tc),
            score_inputs(gguf_sha256="a" * 64, base_sha256=None, text_sha256="t" * 64,
                         spec=Evaluation(file="e.txt"), toolchain=tc),
            quantize_inputs(base=base, qtype="Q4_K_M", imatrix=None, extra_args=[], toolchain=tc),
            convert_inputs(model=ModelSnapshot(Path("/m"), None, None, None, {}, "d" * 64), base_type="f16",
                           model_name="m", toolchain=tc))]
    assert [a != b for a, b in zip(keys[False], keys[True])] == [True, True, False, False]
    assert _toolchain(False).build == toolchain.PIN.commit  # CPU stores made before this keep their keys


@pytest.mark.parametrize("cuda", [True, False])
def test_perplexity_and_bench_offload_only_with_cuda(cuda, tmp_path, monkeypatch):
    from quantkit.scoring import llamacpp as evaluate_gguf

    seen = []
    bench_rows = ('{"n_prompt": 128, "n_gen": 0, "avg_ts": 10.0, "stddev_ts": 0.1}\n'
                  '{"n_prompt": 0, "n_gen": 32, "avg_ts": 5.0, "stddev_ts": 0.1}')

    def fake_run_tool(cmd, **kw):
        seen.append([os.fspath(c) for c in cmd])
        return ToolRun(tuple(seen[-1]), 0, 0.1, 1.0, bench_rows)

    monkeypatch.setattr(evaluate_gguf, "run_tool", fake_run_tool)
    evaluate_gguf._perplexity(["-m", tmp_path / "m.gguf"], workdir=tmp_path, toolchain=_toolchain(cuda), threads=2)
    evaluate_gguf.bench_gguf(gguf=tmp_path / "m.gguf", toolchain=_toolchain(cuda), threads=2)
    for argv in seen:
        if cuda:
            i = argv.index("-ngl")
            assert argv[i + 1] == "999", argv
        else:
            assert "-ngl" not in argv, argv


# --- the report ----------------------------------------------------------------------------------

CPU = {"F16": {"format": "gguf", "ppl": 20.0, "kld_mean": 0.0},
       "Q4_K_M": {"format": "gguf", "ppl": 21.0, "kld_mean": 0.0500},
       "gptq-4b-g64": {"format": "gptq", "ppl": 22.0, "kld_mean": 0.0800}}


def test_figures_within_tolerance_agree():
    gpu = {"F16": {"format": "gguf", "ppl": 20.01, "kld_mean": 0.0},
           "Q4_K_M": {"format": "gguf", "ppl": 21.0 * (1 + 5e-4), "kld_mean": 0.0505}}
    rows = compare_scores(CPU, gpu, Tolerance())
    by = {r["label"]: r for r in rows}
    assert [r["label"] for r in rows] == ["F16", "Q4_K_M", "gptq-4b-g64"]
    assert by["F16"]["agrees"] is True and by["Q4_K_M"]["agrees"] is True
    assert by["Q4_K_M"]["ppl_rel_diff"] == pytest.approx(5e-4)
    assert by["Q4_K_M"]["kld_abs_diff"] == pytest.approx(5e-4)
    assert by["gptq-4b-g64"]["agrees"] is None and by["gptq-4b-g64"]["why"] == "not run on the GPU"
    s = summarize(rows)
    assert s == {"compared": 2, "agree": 2, "disagree": [], "not_compared": ["gptq-4b-g64"], "all_agree": True}


def test_disagreement_beyond_tolerance_is_flagged():
    gpu = {"F16": {"format": "gguf", "ppl": 20.0 * 1.002, "kld_mean": 0.0},
           "Q4_K_M": {"format": "gguf", "ppl": 21.0, "kld_mean": 0.0520},
           "Q2_K": {"format": "gguf", "ppl": 30.0, "kld_mean": 0.3}}
    rows = {r["label"]: r for r in compare_scores(CPU, gpu, Tolerance())}
    assert rows["F16"]["agrees"] is False and rows["F16"]["why"] == "PPL differs by +2.00e-03 (tolerance 0.001)"
    assert rows["Q4_K_M"]["agrees"] is False
    assert rows["Q4_K_M"]["why"] == "mean KLD differs by +2.00e-03 (tolerance 0.001)"
    assert rows["Q2_K"]["agrees"] is None and rows["Q2_K"]["why"] == "no CPU figure"
    s = summarize(list(rows.values()))
    assert s["disagree"] == ["F16", "Q4_K_M"] and s["all_agree"] is False
    # A looser tolerance lets both through.
    loose = compare_scores(CPU, gpu, Tolerance(ppl_rtol=3e-3, kld_atol=3e-3))
    assert summarize(loose)["all_agree"] is True


def test_nan_on_the_gpu_disagrees():
    rows = compare_scores({"F16": CPU["F16"]}, {"F16": {"ppl": float("nan"), "kld_mean": 0.0}}, Tolerance())
    assert rows[0]["agrees"] is False and "not finite" in rows[0]["why"]


def _report(gpu_variants, reference, model_digest="abc"):
    return build_report(mode="cuda", machine={"gpu": "NVIDIA H200", "compute_cap": "9.0"},
                        toolchain={"cuda": True}, build_seconds=123.4,
                        steps=[{"step": "convert", "seconds": 1.5}, {"step": "imatrix", "seconds": 2.25}],
                        variants=gpu_variants, reference=reference, tol=Tolerance(),
                        checkpoints={"status": "skipped", "reason": "--skip-gptq"},
                        model={"path": "/m", "digest": model_digest}, seconds=200.0)


def test_report_format(tmp_path):
    ref = {"path": "cpu.json", "mode": "gpu-check --cpu", "model_digest": "abc", "variants": CPU}
    report = _report({"F16": {"format": "gguf", "ppl": 20.0, "kld_mean": 0.0}}, ref)
    report = json.loads(json.dumps(report))  # plain JSON, no floats that JSON cannot hold
    assert report["schema"] == "quantkit.gpu-check/1" and report["mode"] == "cuda"
    assert report["build_seconds"] == 123.4
    assert [s["step"] for s in report["steps"]] == ["convert", "imatrix"]
    assert report["tolerance"] == {"ppl_rtol": 1e-3, "kld_atol": 1e-3}
    c = report["comparison"]
    assert c["same_model"] is True and c["all_agree"] is True and c["compared"] == 1
    assert c["rows"][0] == {"label": "F16", "format": "gguf", "cpu": {"ppl": 20.0, "kld_mean": 0.0},
                            "gpu": {"ppl": 20.0, "kld_mean": 0.0}, "ppl_rel_diff": 0.0, "kld_abs_diff": 0.0,
                            "agrees": True, "why": ""}
    assert _report({}, None)["comparison"] is None


def test_reference_of_another_model_never_agrees():
    ref = {"path": "cpu.json", "mode": "gpu-check --cpu", "model_digest": "other", "variants": CPU}
    c = _report({"F16": {"format": "gguf", "ppl": 20.0, "kld_mean": 0.0}}, ref)["comparison"]
    assert c["same_model"] is False and c["all_agree"] is False


def test_read_reference_formats(tmp_path):
    own = _report(CPU, None)
    own["mode"] = "cpu"
    (tmp_path / "cpu.json").write_text(json.dumps(own))
    ref = read_reference(tmp_path / "cpu.json")
    assert ref["variants"] == CPU and ref["model_digest"] == "abc"

    (tmp_path / "gpu.json").write_text(json.dumps(_report(CPU, None)))
    with pytest.raises(gpucheck.GpuCheckError, match="is a cuda report, not a CPU one"):
        read_reference(tmp_path / "gpu.json")

    run_report = {"schema": 1, "variants": [{"id": "gguf:Q8_0", "format": "gguf", "label": "Q8_0", "ppl": 20.1,
                                             "kld_mean": 0.001}]}
    (tmp_path / "report.json").write_text(json.dumps(run_report))
    ref = read_reference(tmp_path / "report.json")
    assert ref["variants"] == {"Q8_0": {"format": "gguf", "ppl": 20.1, "kld_mean": 0.001}}

    (tmp_path / "bad.json").write_text('{"schema": 7}')
    with pytest.raises(gpucheck.GpuCheckError, match="neither a gpu-check report"):
        read_reference(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(gpucheck.GpuCheckError, match="cannot read the CPU reference"):
        read_reference(tmp_path / "broken.json")


@pytest.fixture
def fake_model(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


@pytest.mark.parametrize("gpu_ppl, rc", [(21.0, 0), (21.1, 3)])
def test_exit_status_says_whether_gpu_and_cpu_agree(gpu_ppl, rc, tmp_path, fake_model, monkeypatch, capsys):
    own = _report(CPU, None, model_digest="abc")
    own["mode"] = "cpu"
    (tmp_path / "cpu.json").write_text(json.dumps(own))

    def fake_run_check(args):
        ref = read_reference(Path(args.cpu_reference))
        return _report({"Q4_K_M": {"format": "gguf", "ppl": gpu_ppl, "kld_mean": 0.05}}, ref)

    monkeypatch.setattr(gpucheck, "run_check", fake_run_check)
    out = tmp_path / "gpu.json"
    assert main(["gpu-check", "--out", str(out), "--cpu-reference", str(tmp_path / "cpu.json"),
                 "--model", str(fake_model), "--recipe", str(ROOT / gpucheck.DEFAULT_RECIPE)]) == rc
    written = json.loads(out.read_text())
    assert written["comparison"]["all_agree"] is (rc == 0)
    line = capsys.readouterr().out.strip()
    assert line == (f"gpu-check: wrote {out}: 1/1 variants agree with the CPU" if rc == 0 else
                    f"gpu-check: wrote {out}: 0/1 variants agree with the CPU; differ: Q4_K_M")


# --- scripts/gpu-check.sh: arguments and the refusal without CUDA --------------------------------

def _script(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_help_names_every_option():
    r = _script("--help")
    assert r.returncode == 0
    for option in ("--out", "--cpu-reference", "--skip-gptq", "--arch", "--cpu", "--model", "--llama-src"):
        assert option in r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: --out"),
    (["--out", "r.json", "--arch", "sm_90"], "argument --arch: CUDA architecture 'sm_90' is not a CMake"),
    (["--out", "r.json", "--ppl-rtol", "-1"], "argument --ppl-rtol: '-1' must be above 0"),
    (["--out", "r.json", "--jobs", "two"], "argument --jobs: 'two' is not a number"),
    (["--out", "r.json", "--cpu-reference", "/nonexistent/cpu.json"], "--cpu-reference /nonexistent/cpu.json: no such file"),
    (["--out", "r.json", "--model", "/nonexistent"], "--model /nonexistent: no HF checkpoint there"),
    (["--out", "/nonexistent/dir/r.json", "--model", "{model}"], "must be a file in an existing folder"),
    (["--out", "r.json", "--cpu", "--arch", "90", "--model", "{model}"], "--arch and --no-build are for the CUDA"),
    (["--out", "r.json", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_refused(args, message, fake_model):
    r = _script(*[a.replace("{model}", str(fake_model)) for a in args])
    assert r.returncode == 2
    # argparse names the subcommand; an unknown option is the top-level parser's
    assert r.stderr.splitlines()[-1].startswith(("quantkit gpu-check: error: ", "quantkit: error: "))
    assert message in r.stderr.splitlines()[-1]


def test_refuses_without_cuda_in_one_line(tmp_path, fake_model):
    bare = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=bare):
        pytest.skip("this machine has nvidia-smi")
    out = tmp_path / "r.json"
    r = _script("--out", str(out), "--model", str(fake_model), "--skip-gptq", path=bare)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gpu-check: error: no CUDA here: nvidia-smi is not on PATH (run this on a machine with an NVIDIA GPU, "
        "or use --cpu to make the CPU reference)"]
    assert not out.exists()


# --- the carry: what scripts/gpu-check.sh --prepare packs for the lent machine ---------------------

def _fake_cuda_build(folder: Path, *, archs: str | None, cuda: bool = True) -> Path:
    """A finished build folder: real (tiny) ELF executables under the tools' names and the stamp."""
    (folder / "bin").mkdir(parents=True)
    exe = shutil.which("true")
    for name in toolchain.BINARIES:
        shutil.copy(exe, folder / "bin" / name)
    args = cmake_args(cuda=cuda, cuda_arch=archs)
    (folder / toolchain.STAMP).write_text(json.dumps({"cuda": cuda, "cmake_args": args}))
    return folder


@pytest.mark.skipif(shutil.which("strip") is None, reason="needs strip (binutils)")
def test_carry_packs_stripped_sm90_tools_and_checks_them_on_arrival(tmp_path, monkeypatch):
    import tarfile

    build = _fake_cuda_build(tmp_path / "build", archs="90")
    src = _fake_tree(tmp_path / "src", monkeypatch)
    (src / "gguf-py" / "gguf").mkdir(parents=True)
    (src / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (src / "conversion").mkdir()
    (src / "conversion" / "__init__.py").write_text("")
    (src / "ggml").mkdir()
    (src / "ggml" / "big.cu").write_text("x" * 1000)  # the binaries are carried built: no sources
    carry = tmp_path / "carry"
    carry.mkdir()
    packed = gpucheck.pack_cuda_binaries(build, carry / gpucheck.CUDA_BINARIES)
    assert packed["arch"] == "90" and set(packed["binaries"]) == set(toolchain.BINARIES)
    assert all(b["stripped"] <= b["built"] for b in packed["binaries"].values())
    gpucheck.pack_source(src, carry / gpucheck.SOURCE_TREE)
    with tarfile.open(carry / gpucheck.SOURCE_TREE) as tar:
        assert sorted(tar.getnames()) == ["conversion/__init__.py", "convert_hf_to_gguf.py",
                                          "gguf-py/gguf/__init__.py"]
    manifest = gpucheck.write_carry_manifest(carry, repo_bytes=1000, details={"cuda_binaries": packed})
    assert set(manifest["files"]) == {gpucheck.CUDA_BINARIES, gpucheck.SOURCE_TREE}
    assert manifest["total_bytes"] == manifest["carried_bytes"] + 1000 and manifest["fits"]
    assert manifest["carried_bytes"] == sum((carry / f).stat().st_size for f in manifest["files"])

    env = gpucheck.unpack_carry(carry, tmp_path / "there")
    bin_dir = Path(env["QUANTKIT_LLAMA_CPP_BIN"])
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(toolchain.BINARIES)
    assert os.access(bin_dir / "llama-perplexity", os.X_OK)
    assert (Path(env["QUANTKIT_LLAMA_CPP_SRC"]) / "convert_hf_to_gguf.py").is_file()
    assert env["QUANTKIT_CUDA"] == "1"

    # A file changed on the way is named, and nothing runs on it.
    with open(carry / gpucheck.SOURCE_TREE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(gpucheck.GpuCheckError, match=f"carried files missing or changed: {gpucheck.SOURCE_TREE}"):
        gpucheck.check_carry(carry)


@pytest.mark.parametrize("archs, cuda, message", [
    ("80;90", True, "is for architectures 80;90, the carry takes 90 only"),
    ("89", True, "is for architectures 89, the carry takes 90 only"),
    ("90-virtual", True, "is for architectures 90-virtual, the carry"),
    (None, True, "is for architectures ggml default"),
    (None, False, "is a CPU build, not a CUDA one"),
])
def test_carry_refuses_a_build_for_other_gpus(tmp_path, archs, cuda, message):
    """Only sm_90 machine code travels (``90-real``, without the PTX, too: see the next test)."""
    build = _fake_cuda_build(tmp_path / "build", archs=archs, cuda=cuda)
    with pytest.raises(gpucheck.GpuCheckError, match=message):
        gpucheck.pack_cuda_binaries(build, tmp_path / "out.tar.xz")
    assert not (tmp_path / "out.tar.xz").exists()


@pytest.mark.skipif(shutil.which("strip") is None, reason="needs strip (binutils)")
@pytest.mark.parametrize("archs", ["90-real", "90a"])
def test_carry_takes_sm90_without_ptx_too(tmp_path, archs):
    build = _fake_cuda_build(tmp_path / "build", archs=archs)
    assert gpucheck.pack_cuda_binaries(build, tmp_path / "out.tar.xz")["arch"] == archs


def test_carry_without_a_cuda_build_says_how_to_make_one(tmp_path):
    with pytest.raises(gpucheck.GpuCheckError, match="quantkit toolchain --build --cuda --cuda-arch 90"):
        gpucheck.pack_cuda_binaries(tmp_path / "none", tmp_path / "out.tar.xz")


def test_carry_over_the_limit_is_refused_and_its_manifest_kept(tmp_path):
    carry = tmp_path / "carry"
    (carry / "model").mkdir(parents=True)
    (carry / "model" / "weights").write_bytes(b"w" * 4096)
    with pytest.raises(gpucheck.GpuCheckError, match="over the 0 MiB a device call takes"):
        gpucheck.write_carry_manifest(carry, repo_bytes=100, limit=4000)
    manifest = json.loads((carry / gpucheck.CARRY_MANIFEST).read_text())
    assert manifest["files"]["model/weights"]["bytes"] == 4096 and manifest["fits"] is False
    assert manifest["total_bytes"] == 4196


def test_carry_without_manifest_is_refused(tmp_path):
    with pytest.raises(gpucheck.GpuCheckError, match="run scripts/gpu-check.sh --prepare"):
        gpucheck.check_carry(tmp_path)


def test_repository_bytes_counts_what_git_sends():
    n = gpucheck.repository_bytes(ROOT)
    assert n >= (ROOT / "quantkit" / "gpucheck.py").stat().st_size
    assert n < gpucheck.CARRY_LIMIT


def test_prepare_without_a_cuda_build_says_so_and_keeps_the_last_carry(tmp_path):
    carry = ROOT / gpucheck.CARRY
    before = sorted(p.name for p in carry.iterdir()) if carry.is_dir() else None
    env = {**os.environ, "PYTHON": sys.executable, "QUANTKIT_CACHE": str(tmp_path / "empty")}
    r = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 1
    build = tmp_path / "empty" / "llama.cpp" / f"{toolchain.PIN.commit}-cuda"
    assert r.stderr.strip().splitlines() == [
        f"gpu-check: error: no finished CUDA build in {build} (no readable toolchain.json); build it with "
        "`quantkit toolchain --build --cuda --cuda-arch 90`"]
    assert (sorted(p.name for p in carry.iterdir()) if carry.is_dir() else None) == before
    assert not (ROOT / f"{gpucheck.CARRY}.partial").exists()


@pytest.mark.parametrize("inside", [".gpu-carry.partial/model", "models/tiny"])
def test_check_recipe_takes_a_model_inside_the_project(inside):
    recipe, root = gpucheck.load_check_recipe(ROOT / gpucheck.DEFAULT_RECIPE, ROOT / inside, bench=True)
    assert recipe.model.path == inside and recipe.model.repo is None and root == ROOT
    assert recipe.evaluation.tasks == [] and recipe.evaluation.bench


def test_check_recipe_refuses_a_model_outside_the_project(tmp_path):
    with pytest.raises(gpucheck.GpuCheckError, match=f"--model {tmp_path}: must be inside the project"):
        gpucheck.load_check_recipe(ROOT / gpucheck.DEFAULT_RECIPE, tmp_path, bench=False)


def test_cuda_library_dirs_are_this_pythons_nvidia_wheels():
    """On the lent machine the carried tools load libcublas from torch's nvidia-* wheels; here the
    `cuda` extra's nvidia-cublas stands in for them when installed."""
    dirs = gpucheck.cuda_library_dirs()
    for d in dirs:
        assert d.name == "lib" and d.parent.parent.name == "nvidia"
        assert any(d.glob("libcublas*.so.*")) or any(d.glob("libcudart.so.*"))
    try:
        importlib.metadata.version("nvidia-cublas")
    except importlib.metadata.PackageNotFoundError:
        return
    assert any((d / "libcublas.so.13").is_file() for d in dirs)
