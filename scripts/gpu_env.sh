# Sourced by gpu_bench.sh and gpu_scaling.sh: install the wheels the GPU image lacks (diffusers,
# bitsandbytes) from WHEEL_DIR into a temp site dir, and put flux_lora on the path.
wheels=${wheels:-.whl}
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl && export PYTHONPATH=$site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The lent image sets PYTHONDONTWRITEBYTECODE=1 and ships torch without .pyc files, so every process
# compiled torch, sympy, transformers and diffusers from source: ~10 s of each start (session 15).
# Compile them once, as pip does at install time; PRECOMPILE=0 keeps the bare image.
if [ "${PRECOMPILE:-1}" = 1 ]; then
    purelib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    [ -d "$purelib/torch/__pycache__" ] || python3 -m compileall -q -j 0 "$purelib" ${site:-} "$PWD/flux_lora" > /dev/null 2>&1 || true
fi
