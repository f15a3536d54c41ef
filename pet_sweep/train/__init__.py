"""The only place fastai trains: data, the tensor cache, the chapter-5 recipe, its
callbacks, the learning-rate finder and pretraining. Importing this package loads
nothing heavy; its modules import torch and fastai."""
