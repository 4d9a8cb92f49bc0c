from hypothesis import settings

settings.register_profile("linalg", max_examples=25, deadline=None)
settings.load_profile("linalg")
