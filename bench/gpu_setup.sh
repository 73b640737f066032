# Source this on the offline GPU machine, from the repository root:
#   . bench/gpu_setup.sh && python3 bench/bench_gpu.py ...
# It installs the wheels carried in .whl/ (what the machine lacks: pydantic,
# fastapi, starlette, uvicorn, grpc health/reflection, xgrammar) into /tmp/site and
# makes the source tree importable as autoglm_server without building anything.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/pp && ln -sfn "$PWD/server" /tmp/pp/autoglm_server
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
