"""Decoder comparison (benchmarks/decoder_pframe_map01_cpu/results.json) on data/map01-val: 64 clips of 8 frames; the P-frame decoders decode frames 1-7 of
each clip in a chain (frame 0 real, each next against the one decoded before), as the engine shows them."""
import json, subprocess, sys, torch, numpy as np, cv2
torch.set_num_threads(1)
from worldmodel.training.autoencoder import load_autoencoder, median_sharpness
from worldmodel.training.clips import read_clips
from worldmodel.metrics import psnr_frames
out = sys.argv[1]
runs = {"doom-tiny (shipped, plain)": "checkpoints/doom-tiny",
        "P-frame, L1+MSE (runs/pdec-adv0, 2000 steps)": "runs/pdec-adv0",
        "P-frame, + adversarial 0.005 (runs/pdec-adv0.005, 2000 steps)": "runs/pdec-adv0.005",
        "P-frame, + adversarial 0.02 (runs/pdec-adv0.02, 2000 steps)": "runs/pdec-adv0.02"}
c, _ = read_clips("data/map01-val", "val", 8, 64, progress=False)
real = c[:, 1:]
res, rows = {}, [real[[3, 11, 20, 29, 40, 52], -1]]
for name, path in runs.items():
    ae, _ = load_autoencoder(path)
    with torch.no_grad():
        z = ae.encode(real.flatten(0, 1)).view(64, 7, ae.cfg.latent_channels, *ae.cfg.latent_size)
        seq = ae.decode_sequence(z, c[:, 0])
    p = psnr_frames(seq.flatten(0, 1), real.flatten(0, 1)).view(64, 7)
    res[name] = {"psnr_db": round(p.mean().item(), 2), "psnr_by_chain_position": [round(v, 2) for v in p.mean(0).tolist()],
                 "median_sharpness": round(median_sharpness(seq.flatten(0, 1)), 1)}
    rows.append(seq[[3, 11, 20, 29, 40, 52], -1])
img = torch.stack(rows).permute(0, 2, 1, 3, 4).reshape(len(rows) * 96, 6 * 128, 3).numpy()
cv2.imwrite(f"{out}/strip_real_plain_p0_p0005_p002.png", cv2.resize(img, (img.shape[1] * 2, img.shape[0] * 2), interpolation=cv2.INTER_NEAREST)[..., ::-1])
from worldmodel.metrics import frame_stats
rs = np.array([frame_stats(f)["sharpness"] for f in real.flatten(0, 1).numpy()])
doc = {"tool": "benchmarks/decoder_pframe_map01_cpu/compare_decoders.py (python compare_decoders.py OUT_DIR, from the repository root, after the runs)", "device": "AMD EPYC, 2 cores, avx512_bf16, PyTorch 2.13 CPU, float32",
       "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "frames": "64 clips of 8 consecutive frames of data/map01-val (read_clips), frames 1-7 of each decoded (448); P-frame decoders in a chain from the real frame 0",
       "real_sharpness_percentiles_1_50_99": [round(float(v), 1) for v in np.percentile(rs, [1, 50, 99])],
       "decoders": res,
       "strip": "strip_real_plain_p0_p0005_p002.png: rows real frame 7, plain, P-frame L1+MSE, + adversarial 0.005, + adversarial 0.02 (frame 7 = 7th in the chain)",
       "command": "worldmodel train autoencoder --data data/map01 --val-data data/map01-val --init checkpoints/doom-tiny --decoder-only --set ae_p_frame=true --max-frames 60000 --batch 16 --crop 48x64 --lr 3e-4 --steps 2000 --val-every 500 --ckpt-every 250 --threads 1 --adv-weight W --adv-start 200 --out RUN"}
json.dump(doc, open(f"{out}/results.json", "w"), indent=1)
print(json.dumps(res, indent=1))
