"""The Gradio interface of ParaStep Studio; talks only to a backend from launcher/."""
