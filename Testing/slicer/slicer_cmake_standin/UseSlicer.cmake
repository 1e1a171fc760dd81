# slicerMacroBuildScriptedModule as Slicer's (via ctkMacroCompilePythonScript) lays files out:
# SCRIPTS and RESOURCES keep their path relative to the module's source folder, in the build tree
# and under Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR. Byte-compilation is left out.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "${CMAKE_CURRENT_SOURCE_DIR}/${file}: listed for module ${MY_SLICER_NAME} but missing")
    endif()
    get_filename_component(subdir "${file}" DIRECTORY)
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file} ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file} COPYONLY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${file} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${subdir}
      COMPONENT RuntimeLibraries)
  endforeach()
endmacro()
