"""Train a tiny BLIP on synthetic phantoms with LoRA and caption held-out phantoms — offline, on a CPU.

    python examples/quickstart_phantoms.py
"""

from medblip_peft import Captioner, adapt
from medblip_peft.data import make_phantoms
from medblip_peft.demo import DEMO_MODEL, phantom_accuracy
from medblip_peft.testing import tiny_blip

model, processor = tiny_blip(**DEMO_MODEL)
model.save_pretrained("runs/tiny-base")  # a LoRA adapter must point at a loadable base
processor.save_pretrained("runs/tiny-base")

train = make_phantoms(2000, seed=0, image_size=DEMO_MODEL["image_size"])
test = make_phantoms(100, seed=2, image_size=DEMO_MODEL["image_size"])
result = adapt("runs/tiny-base", train, strategy="lora", output_dir="runs/tiny-lora", num_epochs=8,
               learning_rate=3e-3, lora_r=16, batch_size=16, report_to="none")

captioner = Captioner.from_pretrained("runs/tiny-lora")
predictions = captioner(list(test["image"]), num_beams=1)
print(phantom_accuracy(predictions, test))
print(predictions[:3])
