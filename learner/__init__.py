from learner.learner import Learner

__all__ = ["Learner"]
