# Minimal stand-in for the CMake package of a Slicer build (Slicer_DIR), for the packaging test:
# just what PLBOpt's CMakeLists use, with the install layout of a real extension package.
set(Slicer_FOUND TRUE)
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 12)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.12/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.12/qt-scripted-modules")
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
