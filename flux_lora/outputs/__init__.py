"""What a run leaves for people and tools: the atomic file writer, events and display, watch, plots, previews, export."""
