import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from gns.finder import continue_training, find_batch_size

x = np.random.default_rng(0).normal(size=(50_000, 16)).astype(np.float32)
y = x.sum(1) + np.random.default_rng(1).normal(size=len(x)).astype(np.float32)  # y = x·1 + noise
model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(1)])
params = model.init(jax.random.key(0), x[:1])

def loss_fn(params, batch):  # the mean training loss over the batch
    return jnp.mean((model.apply(params, batch["x"])[:, 0] - batch["y"]) ** 2)

def batch_fn(size, index):  # examples [index*size, (index+1)*size) of one stream
    i = np.arange(index * size, (index + 1) * size) % len(x)
    return {"x": x[i], "y": y[i]}

result = find_batch_size(loss_fn, params, optax.adam(1e-3), batch_fn, learning_rate=1e-3)
rec = result.recommendation  # also result.warnings, .seconds, .to_dict(), .plot() (figures)
print(f"batch {rec.batch_size}, lr {rec.learning_rate:.2g}, {result.basis}\n{rec.reason}")
state, losses = continue_training(loss_fn, optax.adam(rec.learning_rate), batch_fn, result, 300)
