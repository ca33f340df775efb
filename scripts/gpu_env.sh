# Sourced by gpu_bench.sh and gpu_scaling.sh: install the wheels the GPU image lacks (diffusers,
# bitsandbytes) from WHEEL_DIR into a temp site dir, and put flux_lora on the path.
wheels=${wheels:-.whl}
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl && export PYTHONPATH=$site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
