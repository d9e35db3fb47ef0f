"""A stand-in for a training script: fits y = a*x + b by gradient descent and saves the weights."""

import argparse
import json
import os
import random

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
args = parser.parse_args()

random.seed(0)
data = [(x, 3 * x + 1 + random.gauss(0, 0.1)) for x in [i / 100 for i in range(100)]]
a, b, lr = 0.0, 0.0, 0.5
STEPS_PER_EPOCH = 10  # few enough that each epoch still improves the fit
for epoch in range(1, args.epochs + 1):
    for _ in range(STEPS_PER_EPOCH):
        ga = sum(2 * (a * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (a * x + b - y) for x, y in data) / len(data)
        a, b = a - lr * ga, b - lr * gb
    loss = sum((a * x + b - y) ** 2 for x, y in data) / len(data)
    print(f"epoch {epoch}: loss={loss:.5f} a={a:.3f} b={b:.3f}")

os.makedirs("model", exist_ok=True)
with open("model/weights.json", "w") as f:
    json.dump({"a": a, "b": b, "run": os.environ.get("RUN_NAME")}, f)
print("saved model/weights.json")
