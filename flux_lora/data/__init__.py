"""Stage 1's side: images in (folder, ZIP, URL), captions, and the cache contract that train reads."""
