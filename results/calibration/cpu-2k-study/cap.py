import logging, sys
sys.path.insert(0, '/work/main')
logging.basicConfig(level=logging.INFO)
from evals.models import load_model
from calibrate.capture import capture_to_disk
import torch
torch.set_num_threads(2)
m, tok = load_model("smollm2", device="cpu")
capture_to_disk(m, tok, sys.argv[1], layers=[int(x) for x in sys.argv[4].split(",")], corpus="pydoc", seq_len=int(sys.argv[2]), samples=int(sys.argv[3]), seed=0, model_name="smollm2")
