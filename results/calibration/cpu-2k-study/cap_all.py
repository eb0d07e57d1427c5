import logging, sys
sys.path.insert(0, '/work/main')
logging.basicConfig(level=logging.INFO)
from evals.models import load_model
from evals.data import token_windows
from calibrate.capture import capture_to_disk
import torch
torch.set_num_threads(2)
m, tok = load_model("smollm2", device="cpu")
w = token_windows(tok, "pydoc", 2048, 55, seed=None)
capture_to_disk(m, w, '/tmp/hs/all2k', layers=[3,4,6,8,12,20], model_name="smollm2")
torch.save(w.input_ids, '/tmp/hs/all2k_ids.pt')
