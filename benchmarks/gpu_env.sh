# Sourced by the GPU scripts: the environment of a lent device machine (no network), and what it has.
# Put a transformers wheel with DiffusionGemma in .whl/ beforehand (`pip download --no-deps transformers==5.23.0
# -d .whl`) and carry it: the device's own transformers predates the model.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if ! python3 -c "import transformers.models.diffusion_gemma" 2>/dev/null && ls .whl/transformers-*.whl >/dev/null 2>&1
then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
