"""The web app on top of the library: Gradio and Plotly live here, never in the core modules."""
