// the page's script: see the next commit
