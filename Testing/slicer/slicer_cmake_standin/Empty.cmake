# Extension description file and CPack set-up: not needed to install into a folder.
