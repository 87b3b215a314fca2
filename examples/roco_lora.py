"""Fine-tune BLIP-base on ROCO with LoRA on a GPU with Hub access, then score and publish it.

    accelerate launch examples/roco_lora.py          # one or many GPUs
"""

from medblip_peft import AdaptConfig, adapt, score_captions
from medblip_peft.data import load_caption_dataset

config = AdaptConfig(mixed_precision="bf16", batch_size=32, num_epochs=3, eval_max_samples=500,
                     metric_for_best="cider", save_every_steps=500)
result = adapt("Salesforce/blip-image-captioning-base", "mdwiratathya/ROCO-radiology", strategy="lora",
               eval_data="mdwiratathya/ROCO-radiology", output_dir="runs/roco-lora", config=config)

test = load_caption_dataset("mdwiratathya/ROCO-radiology", split="test").select(range(1000))
predictions = result.captioner(batch_size=64)(list(test["image"]))
print(score_captions(predictions, list(test["caption"]), n_resamples=1000))
# result.push_to_hub("your-org/blip-roco-lora")   # private by default
