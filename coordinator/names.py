"""Readable run names: adjective-animal-N."""

import random

ADJECTIVES = (
    "amber brave calm dark eager fancy gentle happy icy jolly keen lucky mellow noble odd proud quiet rapid"
    " shy tidy upbeat vivid wet wise young zesty bold crisp dusty fuzzy grumpy hungry lazy nimble plucky"
    " rusty silly sleepy smart sunny swift tall witty"
).split()
ANIMALS = (
    "ant badger bat bear beaver bison cat cobra crab crow deer dingo dog dolphin duck eagle eel elk ferret"
    " fox frog gecko goat goose hawk heron horse ibis jackal koala lemur lion llama lynx mole moose newt"
    " otter owl panda parrot puma rabbit raven seal shark sloth snail swan tiger toad turtle walrus wolf yak"
    " zebra mongoose"
).split()


def random_run_prefix() -> str:
    return f"{random.choice(ADJECTIVES)}-{random.choice(ANIMALS)}"
